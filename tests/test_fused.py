"""The fused path: one compiled computation per parameter group (over flat buffers) runs the same stats and steppers as
the eager path, gives the same results (float32, 100 steps, rtol 1e-5) without storing a temporary of the buffers'
size, moves nothing on zero gradients, does not recompile as lr, mom and step counts change or on freeze/unfreeze, and
keeps the same state, so either mode can resume the other's. The pitfalls of flat buffers are tested in test_flat.py."""
import copy, re
from functools import partial
import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
import fastopt
from fastopt.fused import _reduces
from helpers import SEED_OPTIMIZERS as optimizers

# Every optimizer with its defaults (the graphs test_hostile and test_resume compile too, so inductor's cache serves them
# there), and weight decay in both modes where it matters: fastai's two callbacks, Lamb's own, and the ForEach trap below
CASES = [(n, dict(beta=5.) if n == 'BAdam' else {}) for n in optimizers]
CASES += [(n, dict(decouple_wd=d, wd=0.1, **kw)) for n,kw in [('Adam', {}), ('Lamb', {}), ('Lamb', dict(trust_wd=True)), ('SGD', dict(mom=0.9)),
          ('Larc', dict(clip=False))] for d in (True, False) if d or 'trust_wd' not in kw]
CASES += [(n, kw) for n,kw in [('SGD', {}), ('RMSProp', dict(mom=0.9)), ('QHAdam', {}), ('Larc', {})]]

def make_params():
    g = torch.Generator().manual_seed(0)
    groups = [[torch.randn(4, 16, 2, 2, generator=g), torch.randn(4, generator=g)],       # group 0: frozen for the first 40 steps; rows of 64
              [torch.randn(5, 3, generator=g), torch.randn(3, generator=g), torch.zeros(4)]]  # bias-like, sometimes no grad, all zero
    return [[p.requires_grad_() for p in pg] for pg in groups]

def run(name, fused, n=100, **kw):
    groups = make_params()
    opt = getattr(fastopt, name)(groups, lr=1e-2, fused=fused, **kw)
    opt.state[groups[0][1]]['do_wd'] = False     # the ForEach trap: a do_wd=False parameter in L2 mode
    opt.state[groups[1][1]]['do_wd'] = False
    g = torch.Generator().manual_seed(1)
    for t in range(n):
        opt.set_hypers(lr=1e-2 * (1 + (t % 7) / 7), mom=0.9 - 0.05 * (t % 3) / 3)
        for i,pg in enumerate(groups):
            for j,p in enumerate(pg):
                grad = torch.randn(p.shape, generator=g)
                frozen = i == 0 and t < 40
                skip = i == 1 and j == 1 and t % 3 == 0
                p.grad = None if frozen or skip else grad
        opt.step()
    return [p.detach() for pg in groups for p in pg] + [p.grad for pg in groups for p in pg], opt

@pytest.mark.parametrize('name,kw', CASES, ids=[f'{n}-{kw}' for n,kw in CASES])
def test_fused_equals_eager(name, kw):
    "Fused equals eager, the gradients that callbacks change (`l2_reg`, `sign_grad`, `centralize_grad`) included; the compiled step stores no temporary of the flat buffers' `[nblocks, 64]` size (a reducing step's passes recompute instead: `recompute_inductor_options`); with its defaults and wd=0, zero gradients move nothing"
    (fused, opt), codes = run_and_get_code(run, name, True, **kw)
    assert opt.fused and all(opt._flat[i].buckets for i in (0, 1)), 'the fused path fell back to eager, which would make this comparison vacuous'
    eager, _ = run(name, False, **kw)
    for i,(a,b) in enumerate(zip(fused, eager)):
        assert (a is None) == (b is None), f'value {i}: a gradient in only one of fused ({a is not None}) and eager ({b is not None})'
        if a is not None: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    allocs = [l.strip() for c in codes for l in c.splitlines() if 'empty_strided_cpu((' in l]
    assert codes, 'no compiled code captured'
    if _reduces(opt.cbs): assert any(re.search(r'empty_strided_cpu\(\(s\d+, ', a) for a in allocs), allocs   # its per-block sums, sized by the block count: the pattern matches this inductor's code
    assert not [a for a in allocs if re.search(r'empty_strided_cpu\(\(s\d+, 64\)', a)], allocs
    if 'wd' not in kw: assert_zero_grads_move_nothing(name, **kw)

def assert_zero_grads_move_nothing(name, **kw):
    "With wd=0, 7 fused steps on all-zero gradients from fresh state leave every parameter bit-identical (why each update is then zero: tests/test_properties.py, property 5)"
    groups = make_params()
    init = [p.detach().clone() for pg in groups for p in pg]
    # wd=0 is the default of all but Adam and AMSGrad, so the others step with the graph the fused run above compiled
    opt = getattr(fastopt, name)(groups, lr=1e-2, fused=True, **{**kw, 'wd': 0.})
    for _ in range(7):
        for pg in groups:
            for p in pg: p.grad = torch.zeros_like(p)
        opt.step()
    assert opt.fused and all(opt._flat[i].buckets for i in (0, 1)), 'the fused path fell back to eager'
    for i,(p,p0) in enumerate(zip([p for pg in groups for p in pg], init)):
        assert torch.equal(p, p0), f'{name}: parameter {i} {tuple(p.shape)} moved by up to {(p - p0).abs().max().item():.3g} on zero gradients'

def test_l2_decay_skips_do_wd_false_when_fused():
    "fastxtend's ForEach path applied L2 decay to do_wd=False parameters: here such a parameter with zero grads stays put"
    p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = fastopt.Adam([p, q], lr=0.1, wd=0.5, decouple_wd=False, fused=True)
    opt.state[p]['do_wd'] = False
    for _ in range(3):
        p.grad, q.grad = torch.zeros(3), torch.zeros(3)
        opt.step()
    assert torch.equal(p, torch.ones(3)) and (q < 1).all()

def test_no_recompiles_during_fit_one_cycle():
    "lr and mom change every batch and step counts grow: one graph, compiled once and shared by the body and head groups, for the whole fit, and for freeze/unfreeze"
    from fastopt.digits import digits_learner
    torch._dynamo.reset(); counters.clear()
    learn = digits_learner(partial(fastopt.Adam, fused=True))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    assert learn.opt.fused and len(learn.opt._flat) == 2
    fns = set(map(id, learn.opt._fns.values()))
    assert len(learn.opt._fns) == 2 and len(fns) == 1, 'body and head (same callbacks, state and static hypers; do_wd is a mask) should share one compiled step'
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])
    assert not counters['graph_break'] and not counters['recompiles'], (dict(counters['graph_break']), dict(counters['recompiles']))
    for change in (learn.freeze, learn.unfreeze):   # which tensors step is a mask: no new graph
        change()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    assert counters['stats']['unique_graphs'] == 1 and not counters['recompiles'], (dict(counters['stats']), dict(counters['recompiles']))

@pytest.mark.parametrize('first,second', [(True, False), (False, True)], ids=['fused-then-eager', 'eager-then-fused'])
def test_state_is_interchangeable(first, second):
    "A state_dict saved in one mode loads in the other, and training continues with the result of an uninterrupted run"
    def steps(opt, groups, g, n):
        for _ in range(n):
            for pg in groups:
                for p in pg: p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    g = torch.Generator().manual_seed(3)
    groups = make_params()
    opt = fastopt.Lamb(groups, lr=1e-2, wd=0.1, fused=first)
    steps(opt, groups, g, 10)
    sd = copy.deepcopy(opt.state_dict())   # as torch.save/torch.load would: fastai's state_dict shares the live tensors
    resumed = [[p.detach().clone().requires_grad_() for p in pg] for pg in groups]
    opt2 = fastopt.Lamb(resumed, lr=1e-2, wd=0.1, fused=second)
    opt2.load_state_dict(sd)
    g2 = torch.Generator(); g2.set_state(g.get_state())
    steps(opt, groups, g, 10)
    steps(opt2, resumed, g2, 10)
    assert (opt if first else opt2).fused is True and (opt if first else opt2)._flat, 'the fused path fell back to eager'
    for a,b in zip([p for pg in groups for p in pg], [p for pg in resumed for p in pg]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

def test_failed_compile_falls_back_to_eager_with_one_warning():
    def broken_backend(gm, example_inputs): raise RuntimeError('no C++ compiler here')
    groups, ref = make_params(), make_params()
    opt = fastopt.Adam(groups, lr=1e-2, fused=True)
    opt.fused_backend = broken_backend
    eager = fastopt.Adam(ref, lr=1e-2, fused=False)
    with pytest.warns(UserWarning, match='fused step failed to compile') as rec:
        for _ in range(3):
            for pg,qg in zip(groups, ref):
                for p,q in zip(pg, qg): p.grad = torch.ones_like(p); q.grad = torch.ones_like(q)
            opt.step(); eager.step()
    assert len([w for w in rec if 'fastopt' in str(w.message)]) == 1 and not opt.fused
    for pg,qg in zip(groups, ref):
        for p,q in zip(pg, qg): assert torch.equal(p, q)

def test_default_fuses_large_groups_only():
    "fused='auto' (the default) fuses a group once it holds `auto_fuse_numel` values, and steps smaller ones eagerly"
    small, large = [torch.zeros(10, requires_grad=True)], [torch.zeros(30, requires_grad=True), torch.zeros(5, requires_grad=True)]
    opt = fastopt.Adam([small, large], lr=1e-3)
    assert opt.fused == 'auto' and not fastopt.Adam(small, lr=1e-3, fused=False).fused
    opt.auto_fuse_numel = 20
    for _ in range(3):
        for p in small + large: p.grad = torch.ones_like(p)
        opt.step()
    assert 0 not in opt._flat and opt._flat[1].ids == set(map(id, large))
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"): fastopt.Adam(small, lr=1e-3, fused='yes')

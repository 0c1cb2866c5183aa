"""Lion, ADOPT, Schedule-Free AdamW and Muon against their reference implementations (installed by the dev extra):
parity within rtol 1e-6 over 20 float64 steps of random gradients at the reference's defaults (and a second setting
with weight decay), through the kit's `reference` check; all four under 2-process gloo DDP and FSDP2 in one spawn; the
Schedule-Free callback in a Learner; Muon on a whole model."""
import copy, math
from functools import partial
import pytest
import torch
from torch import nn
import fastopt
from fastopt.modern import ScheduleFreeCallback, ScheduleFreeOptimizer, hidden_matrices, newton_schulz
from fastopt.testing import optimizer_checks, distributed_equality, kit_learner

lion_pytorch = pytest.importorskip('lion_pytorch')
pytorch_optimizer = pytest.importorskip('pytorch_optimizer')
schedulefree = pytest.importorskip('schedulefree')

MATRICES = ((4, 3), (3, 5), (6, 6))
# (name, our builder with its options, the reference on a parameter list, the kit's reference options)
CASES = [
    ('Lion-defaults', partial(fastopt.Lion, lr=1e-4), lambda ps: lion_pytorch.Lion(ps), {}),
    ('Lion-wd', partial(fastopt.Lion, lr=3e-3, mom=0.95, avg_mom=0.98, wd=0.1),
     lambda ps: lion_pytorch.Lion(ps, lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1), {}),
    ('ADOPT-defaults', partial(fastopt.ADOPT, lr=1e-3), lambda ps: pytorch_optimizer.ADOPT(ps), {}),
    ('ADOPT-L2', partial(fastopt.ADOPT, lr=1e-2, wd=0.1), lambda ps: pytorch_optimizer.ADOPT(ps, lr=1e-2, weight_decay=0.1), {}),
    ('ADOPT-decoupled', partial(fastopt.ADOPT, lr=1e-2, wd=0.1, decouple_wd=True),
     lambda ps: pytorch_optimizer.ADOPT(ps, lr=1e-2, weight_decay=0.1, weight_decouple=True), {}),
    ('ScheduleFree-defaults', partial(fastopt.ScheduleFreeAdamW, lr=0.0025), lambda ps: schedulefree.AdamWScheduleFree(ps), {}),
    ('ScheduleFree-wd-warmup', partial(fastopt.ScheduleFreeAdamW, lr=1e-2, wd=0.1, warmup_steps=5, r=0.5),
     lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2, weight_decay=0.1, warmup_steps=5, r=0.5), {}),
    ('Muon-defaults', partial(fastopt.Muon, lr=1e-3), lambda ps: torch.optim.Muon(ps), dict(reference_shapes=MATRICES)),
    ('Muon-plain-momentum', partial(fastopt.Muon, lr=0.02, nesterov=False, adjust_lr='match_rms_adamw'),
     lambda ps: torch.optim.Muon(ps, lr=0.02, nesterov=False, adjust_lr_fn='match_rms_adamw'), dict(reference_shapes=MATRICES)),
]

def reference_check(opt_func, ref, **kw):
    f, opts = opt_func.func, dict(opt_func.keywords)
    lr = opts.pop('lr')
    (c,) = [c for c in optimizer_checks(f, lr=lr, fused=False, learner=False, reference=ref, **kw, **opts) if c.name == 'reference']
    return c

@pytest.mark.parametrize('name,opt_func,ref,kw', CASES, ids=[c[0] for c in CASES])
def test_parity_with_reference(name, opt_func, ref, kw):
    "20 float64 steps equal the reference within rtol 1e-6 (Schedule-Free: also after both switch to the eval weights x)"
    print(name, reference_check(opt_func, ref, **kw)())

def test_parity_check_can_fail():
    "The comparison above is not vacuous: Lion with β1 and β2 swapped is caught"
    c = reference_check(partial(fastopt.Lion, lr=1e-4, mom=0.99, avg_mom=0.9), lambda ps: lion_pytorch.Lion(ps))
    with pytest.raises(AssertionError, match='differs from the reference'): c()

def test_torch_default_muon_refuses_what_ours_routes_to_adam():
    "torch.optim.Muon takes 2-D parameters only; fastopt's Muon steps the rest with AdamW in the same optimizer"
    with pytest.raises(ValueError): torch.optim.Muon([torch.zeros(3, requires_grad=True)])
    opt = fastopt.Muon([torch.zeros(3, requires_grad=True), torch.randn(4, 3, requires_grad=True)], lr=1e-3)
    for p in opt.param_lists[0]: p.grad = torch.randn_like(p)
    opt.step()
    assert [opt.state[p]['use_muon'] for p in opt.param_lists[0]] == [False, True]

# ---------------------------------------------------------------- DDP and FSDP2: all four, one spawn

def test_modern_optimizers_under_ddp_and_fsdp2():
    "Both gloo ranks bit-identical, and equal to one process averaging the half-batch gradients (rtol 1e-10), under DDP and FSDP2"
    builders = dict(Lion=partial(fastopt.Lion, wd=0.1), ADOPT=fastopt.ADOPT, ScheduleFreeAdamW=fastopt.ScheduleFreeAdamW, Muon=fastopt.Muon)
    cases = {f'{n}-{mode}': (f, mode) for n,f in builders.items() for mode in ('ddp', 'fsdp')}
    res = distributed_equality(cases, lr=1e-2)
    assert res == {n: None for n in cases}, res

# ---------------------------------------------------------------- Schedule-Free in a Learner

def test_schedule_free_callback_switches_around_validation_and_after_fit(tmp_path):
    learn = kit_learner(fastopt.ScheduleFreeAdamW, tmp_path, cbs=[ScheduleFreeCallback()])
    seen = []
    from fastai.callback.core import Callback
    class Spy(Callback):
        order = 50
        def before_batch(self): seen.append(('train' if self.training else 'valid', self.opt.train_mode))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2, cbs=Spy())
    assert {m for s,m in seen if s == 'train'} == {True} and {m for s,m in seen if s == 'valid'} == {False}
    assert not learn.opt.train_mode       # after fit the model holds x: save, export and get_preds see the averaged weights
    x = [p.detach().clone() for p in learn.model.parameters()]
    learn.opt.train(); learn.opt.eval()
    for a,b in zip(learn.model.parameters(), x): torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    learn.save('sf', with_opt=True)
    fresh = kit_learner(fastopt.ScheduleFreeAdamW, tmp_path, cbs=[ScheduleFreeCallback()])
    fresh.load('sf', with_opt=True)
    assert not fresh.opt.train_mode and all(torch.equal(a, b) for a,b in zip(fresh.model.parameters(), learn.model.parameters()))

def test_schedule_free_lr_find_leaves_the_learner_as_it_was(tmp_path):
    learn = kit_learner(fastopt.ScheduleFreeAdamW, tmp_path, cbs=[ScheduleFreeCallback()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=10, show_plot=False)
    assert not learn.opt.train_mode
    for a,b in zip(learn.model.parameters(), before): assert torch.equal(a, b)

def test_schedule_free_refuses_to_step_in_eval_mode():
    p = torch.zeros(3, requires_grad=True)
    opt = fastopt.ScheduleFreeAdamW([p]).eval()
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match='eval mode'): opt.step()

# ---------------------------------------------------------------- Muon on a whole model

def test_muon_on_a_whole_model_trains(tmp_path):
    "Muon for the hidden Linear weight, AdamW for the conv, the batch norm, the head and the biases, in one opt_func; the loss goes down"
    learn = kit_learner(fastopt.Muon, tmp_path)
    learn.opt_func = partial(fastopt.Muon, muon_params=hidden_matrices(learn.model), adjust_lr='match_rms_adamw', wd=0.01)
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-2)
    losses = [v[0] for v in learn.recorder.values]
    use = [learn.opt.state[p]['use_muon'] for p in learn.model.parameters()]
    assert use == [False, False, False, False, True, False, False, False], use   # conv, bn, head and biases by AdamW
    assert losses[-1] < losses[0], losses

def test_newton_schulz_orthogonalizes_tall_and_wide():
    for shape in [(8, 5), (5, 8)]:
        G = torch.randn(*shape, dtype=torch.float64)
        s = torch.linalg.svdvals(newton_schulz(G).double())
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s)

"""Gradient release (`fastopt.release`): every optimizer gives the weights and state of a normal step, bit for bit; in a
`Learner` with `fit_one_cycle` too; the combinations it cannot honour are refused before anything trains; `opt.step()`
and `opt.zero_grad()` after a released backward change nothing; `peak_tensor_memory` counts what it should; and on 2 gloo
ranks FSDP2's sharded parameters step through the hook (torch runs it after the reduce-scatter) while DDP's plain ones are refused."""
import inspect, os, traceback, warnings
from datetime import timedelta
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.optimizer import OptimWrapper
import fastopt
from fastopt.release import GradientRelease, release_gradients, peak_tensor_memory, step_param

OPTIMIZERS = fastopt.__all__[:fastopt.__all__.index('Muon') + 1]
LRS = [1e-2, 3e-3, 2e-2]   # a schedule: the hook must use the value set before each step

def test_every_optimizer_is_listed():
    assert len(OPTIMIZERS) == 22 and OPTIMIZERS[0] == 'Adam'

def tiny_model(dtype, seed=0):
    "Two linear layers with biases and a tied third use of the first weight, in `dtype`"
    torch.manual_seed(seed)
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a,self.b = nn.Linear(4, 4),nn.Linear(4, 3)
        def forward(self, x): return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))
    return Tied().to(dtype)

def build(name, model, **kw):
    f = getattr(fastopt, name)
    hypers = dict(lr=LRS[0], wd=1e-2) if 'wd' in inspect.signature(f).parameters else dict(lr=LRS[0])
    return f([list(model.a.parameters()), list(model.b.parameters())], **{**hypers, **kw})

def batches(dtype, n=len(LRS)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 4, generator=g, dtype=dtype), torch.randn(6, 3, generator=g, dtype=dtype)) for _ in range(n)]

def train(name, dtype, release, fused=False):
    "Parameters and optimizer after len(LRS) steps, with gradients released or stepped by `opt.step()`"
    model = tiny_model(dtype)
    opt = build(name, model, fused=fused)
    handle = release_gradients(opt) if release else None
    for lr,(x,y) in zip(LRS, batches(dtype)):
        opt.set_hyper('lr', lr)
        nn.functional.mse_loss(model(x), y).backward()
        if release: assert all(p.grad is None for p in model.parameters()), 'a released gradient was kept'
        opt.step(); opt.zero_grad()
    if handle: handle.remove()
    return model, opt

def assert_same(m1, o1, m2, o2):
    for (n,p),q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), f"parameter {n} differs: max |difference| {(p - q).abs().max().item():.3g}"
    for p,q in zip(m1.parameters(), m2.parameters()):
        s1,s2 = o1.state[p],o2.state[q]
        assert s1.keys() == s2.keys()
        for k in s1:
            if isinstance(s1[k], torch.Tensor): assert torch.equal(s1[k], s2[k]), f"state {k!r} differs"
            else: assert s1[k] == s2[k], f"state {k!r} differs"

@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('name', OPTIMIZERS)
def test_release_equals_a_normal_step(name, dtype):
    "Same weights and state, bit for bit, as backward then opt.step(), with the lr changed every step and a tied weight"
    m1,o1 = train(name, dtype, release=False)
    m2,o2 = train(name, dtype, release=True)
    assert not torch.equal(m1.a.weight, tiny_model(dtype).a.weight), 'nothing stepped'
    assert_same(m1, o1, m2, o2)

def test_fused_optimizer_steps_eagerly_while_released():
    "fused=True: the eager step's results, no flat layout (no compile) while released, and the setting back after remove()"
    m1,o1 = train('Lamb', torch.float32, release=False, fused=False)
    model = tiny_model(torch.float32)
    opt = build('Lamb', model, fused=True)
    with release_gradients(opt):
        assert opt.fused is False
        for lr,(x,y) in zip(LRS, batches(torch.float32)):
            opt.set_hyper('lr', lr)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step(); opt.zero_grad()
            assert opt._flat == {}, 'a flat layout (and its gradient buffer) was built while released'
    assert opt.fused is True
    assert_same(m1, o1, model, opt)

def test_step_after_release_steps_only_what_still_has_a_gradient():
    "opt.step() after a released backward changes nothing; a gradient set by hand is still stepped there, once"
    model = tiny_model(torch.float64)
    opt = build('Adam', model)
    handle = release_gradients(opt)
    x,y = batches(torch.float64)[0]
    nn.functional.mse_loss(model(x), y).backward()
    after = [p.detach().clone() for p in model.parameters()]
    opt.step(); opt.zero_grad(); opt.step()
    assert all(torch.equal(p, q) for p,q in zip(model.parameters(), after))
    model.b.bias.grad = torch.ones_like(model.b.bias)
    opt.step()
    assert not torch.equal(model.b.bias, after[-1]) and opt.state[model.b.bias]['step'] == 2
    handle.remove()
    assert handle.hooks == [] and opt.fused == 'auto'
    nn.functional.mse_loss(model(x), y).backward()   # no hook now: the gradient stays
    assert model.a.weight.grad is not None

def test_release_twice_and_foreign_optimizers_are_refused():
    model = tiny_model(torch.float64)
    opt = build('Adam', model)
    with release_gradients(opt):
        with pytest.raises(RuntimeError, match='already released'): release_gradients(opt)
    release_gradients(opt).remove()   # released again once the first is gone
    with pytest.raises(TypeError, match='fastopt optimizer.*SGD'): release_gradients(torch.optim.SGD(model.parameters(), lr=0.1))

def test_second_accumulation_in_a_batch_is_caught():
    "A weight used inside and outside a reentrant checkpoint accumulates twice: with once_per_batch the second raises"
    lin = nn.Linear(3, 3)
    opt = fastopt.Adam(lin.parameters(), lr=0.1)
    with release_gradients(opt) as h:
        h.once_per_batch = True
        h.new_batch()
        x = torch.randn(2, 3, requires_grad=True)
        with pytest.raises(RuntimeError, match='accumulated twice in one batch.*reentrant'):
            checkpoint(lin, lin(x), use_reentrant=True).sum().backward()
        h.new_batch()
        checkpoint(lin, lin(x), use_reentrant=False).sum().backward()   # non-reentrant: one accumulation

def test_sparse_gradient_and_schedule_free_eval_are_refused():
    emb = nn.Embedding(5, 3, sparse=True)
    with release_gradients(fastopt.Adam(emb.parameters(), lr=0.1)):
        with pytest.raises(RuntimeError, match='sparse'): emb(torch.tensor([1, 2])).sum().backward()
    lin = nn.Linear(3, 2)
    opt = fastopt.ScheduleFreeAdamW(lin.parameters())
    opt.eval()
    with release_gradients(opt):
        with pytest.raises(RuntimeError, match='eval mode'): lin(torch.randn(2, 3)).sum().backward()

# ---------------------------------------------------------------- in a Learner

class CountSteps(Callback):
    "Training batches seen"
    order = 100
    def before_fit(self): self.n = 0
    def after_batch(self):
        if self.training: self.n += 1

def fit(learn, *args):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(*args)

def test_learner_fit_one_cycle_equals_no_release():
    "Two epochs of fit_one_cycle (lr and mom scheduled every batch): the same weights and Adam state, bit for bit; one step per training batch, none in validation"
    from fastopt.digits import digits_learner
    normal = digits_learner(fastopt.Adam)
    fit(normal, 2, 1e-2)
    count = CountSteps()
    released = digits_learner(fastopt.Adam, cbs=[GradientRelease(), count])
    fit(released, 2, 1e-2)
    assert_same(normal.model, normal.opt, released.model, released.opt)
    p = next(released.model.parameters())
    assert count.n > 40 and released.opt.state[p]['step'] == count.n
    assert released.opt.fused == 'auto' and all(p.grad is None for p in released.model.parameters())
    x = torch.randn(2, 1, 8, 8)
    released.model(x).sum().backward()   # after the fit the hooks are gone
    assert p.grad is not None

class ReadsGrads(Callback):
    def before_step(self): self.norm = sum(p.grad.norm() for p in self.learn.model.parameters())

class SafeTimer(Callback):
    gradient_release_safe = True
    def before_step(self): pass

@pytest.mark.parametrize('cb,match', [
    (GradientAccumulation(n_acc=128), 'GradientAccumulation: it adds up'),
    (GradientClip(), 'GradientClip: it clips'),
    (MixedPrecision(), 'MixedPrecision in fp16: its GradScaler'),
    (ReadsGrads(), 'ReadsGrads: it defines before_step'),
], ids=['accumulation', 'clip', 'fp16', 'custom'])
def test_learner_refuses_before_training(cb, match):
    from fastopt.digits import digits_learner
    learn = digits_learner(fastopt.Adam, cbs=[GradientRelease(), cb])
    learn.create_opt()
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match=match): fit(learn, 1, 1e-2)
    assert all(torch.equal(p, q) for p,q in zip(learn.model.parameters(), before)), 'a refused fit trained'
    learn.model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None for p in learn.model.parameters()), 'a refused fit left hooks behind'

def test_learner_allows_bf16_and_declared_safe_callbacks_and_refuses_torch_optimizers():
    from fastopt.digits import digits_learner
    learn = digits_learner(fastopt.Adam, cbs=[GradientRelease(), MixedPrecision(amp_mode='bf16'), SafeTimer()])
    before = next(learn.model.parameters()).detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # without CUDA, fastai's CUDA autocast warns that it is disabled
        fit(learn, 1, 1e-2)
    assert not torch.equal(next(learn.model.parameters()), before) and all(p.grad is None for p in learn.model.parameters())
    learn = digits_learner(lambda ps, lr: OptimWrapper(ps, torch.optim.SGD, lr=lr), cbs=GradientRelease())
    with pytest.raises(TypeError, match='fastopt optimizer.*OptimWrapper'): fit(learn, 1, 1e-2)

# ---------------------------------------------------------------- memory

def test_peak_tensor_memory_counts_live_storages():
    "4 MiB made and freed twice peaks at 4 MiB over the baseline; kept both, at 8 MiB; views and in-place ops add nothing"
    base = peak_tensor_memory(lambda: None)
    def one_at_a_time():
        a = torch.zeros(2**20); del a
        b = torch.zeros(2**20); b.add_(1); b[2:].mul_(2)
    def both():
        a,b = torch.zeros(2**20),torch.zeros(2**20)
        return a.view(-1, 4), b
    assert peak_tensor_memory(one_at_a_time) - base == 4 * 2**20
    assert peak_tensor_memory(both) - base == 8 * 2**20
    kept = torch.zeros(2**18)   # alive before it starts: counted too
    assert peak_tensor_memory(lambda: None) - base == 2**20

def test_peak_tensor_memory_leaves_a_fused_optimizer_fused():
    "Dynamo does not compile under a dispatch mode: the fused step runs eagerly there instead of giving up compiling for good"
    model = nn.Linear(8, 4)
    opt = fastopt.Adam(model.parameters(), lr=1e-3, fused=True)
    def step(): model(torch.randn(2, 8)).sum().backward(); opt.step(); opt.zero_grad()
    step()   # first steps are eager; the next one is fused
    before = model.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert peak_tensor_memory(step) > 0
    assert opt.fused is True and not torch.equal(model.weight, before) and opt._flat

# ---------------------------------------------------------------- FSDP2 and DDP on 2 gloo ranks

WORLD = 2
FSDP_NAMES = ['Adam', 'Lamb', 'Muon']   # elementwise, a norm over the whole tensor (an all-reduce), Newton–Schulz on the gathered matrix

def _fsdp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()

def _fsdp_train(name, release, rank):
    from torch.distributed.fsdp import fully_shard
    model = _fsdp_model()
    for m in model:
        if isinstance(m, nn.Linear): fully_shard(m)
    fully_shard(model)
    opt = getattr(fastopt, name)(list(model.parameters()), lr=1e-2, fused=False)
    handle = release_gradients(opt) if release else None
    g = torch.Generator().manual_seed(10 + rank)
    for lr in LRS:
        opt.set_hyper('lr', lr)
        x,y = torch.randn(4, 4, generator=g, dtype=torch.float64),torch.randn(4, 3, generator=g, dtype=torch.float64)
        nn.functional.mse_loss(model(x), y).backward()
        if release: assert all(p.grad is None for p in model.parameters()), 'the hook did not fire on a sharded parameter'
        opt.step(); opt.zero_grad()
    if handle: handle.remove()
    return [p.to_local().detach().clone() for p in model.parameters()]

def _worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=init_method, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    res = {}
    try:
        try: release_gradients(fastopt.Adam(_fsdp_model().parameters(), lr=1e-2)); res['ddp'] = 'accepted'
        except ValueError as e: res['ddp'] = str(e)
        for name in FSDP_NAMES: res[name] = (_fsdp_train(name, False, rank), _fsdp_train(name, True, rank))
    except Exception: res['error'] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()

def test_fsdp2_steps_through_the_hook_and_ddp_is_refused(tmp_path):
    "FSDP2 runs post-accumulate-grad hooks on the sharded parameter after its reduce-scatter: released equals normal on both ranks"
    from spawning import start, join_or_fail
    join_or_fail(start(_worker, (f"file://{tmp_path}/store", str(tmp_path)), WORLD), 300, 'the gradient-release ranks')
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert 'error' not in res, f"rank {rank} raised:\n{res['error']}"
        assert 'before DDP' in res['ddp'] and '2 ranks' in res['ddp'], res['ddp']
        for name in FSDP_NAMES:
            normal,released = res[name]
            for i,(a,b) in enumerate(zip(normal, released)):
                assert torch.equal(a, b), f"{name}, rank {rank}, parameter {i}: max |difference| {(a - b).abs().max().item():.3g}"

def _accumulating_run(which, dtype=torch.float64, rounds=3, n=3, **kw):
    "Weights after `rounds` of `n` batches each, released, every `n`-th stepping the weights and the others accumulated into the state (optimizer accumulation); fastopt's or optimi's Adam"
    import optimi
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    if which == 'fastopt':
        opt = fastopt.Adam(model.parameters(), lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-8, wd=0., **kw)
        handle = release_gradients(opt)
    else:
        opt = optimi.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0., gradient_release=True, **kw)
        optimi.prepare_for_gradient_release(model, opt)
        handle = None
    g = torch.Generator().manual_seed(1)
    for i in range(rounds * n):
        acc = (i + 1) % n != 0
        if which == 'fastopt': handle.accumulate = acc
        else: opt.optimizer_accumulation = acc
        before = [p.detach().clone() for p in model.parameters()]
        x,y = torch.randn(8, 5, generator=g).to(dtype),torch.randn(8, 2, generator=g).to(dtype)
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        assert all(p.grad is None for p in model.parameters()), 'a released gradient was kept'
        moved = [not torch.equal(p, q) for p,q in zip(model.parameters(), before)]
        assert moved == [not acc] * len(moved), f"batch {i}: {'accumulating' if acc else 'stepping'}, the weights moved: {moved}"
    return model, opt, handle

def test_optimizer_accumulation_equals_optimi():
    "Optimizer accumulation (optimi's `optimizer_accumulation`): an accumulating batch's gradient goes into the state and the weights stay; after three rounds of two such batches and a step, float64 weights equal optimi's Adam's to rounding"
    pytest.importorskip('optimi')
    (a,opt,_),(b,_,_) = _accumulating_run('fastopt'),_accumulating_run('optimi')
    for p,q in zip(a.parameters(), b.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    assert opt.state[next(a.parameters())]['step'] == 9   # every batch counts as a step of the state

def test_optimizer_accumulation_keeps_the_compensation():
    "bf16 weights with Kahan compensation: an accumulating batch leaves the compensation as it is (the weights: checked in the run) while the state takes the gradient in; a stepping batch changes both"
    a,opt,handle = _accumulating_run('fastopt', torch.bfloat16)
    for accumulate in (True, False):
        before = {id(p): {k: v.clone() for k,v in opt.state[p].items()} for p in a.parameters()}
        handle.accumulate = accumulate
        nn.functional.mse_loss(a(torch.randn(8, 5).bfloat16()).float(), torch.randn(8, 2)).backward()
        for p in a.parameters():
            st,old = opt.state[p],before[id(p)]
            assert torch.equal(st['weight_comp'], old['weight_comp']) == accumulate, f"accumulate={accumulate}: the compensation {'changed' if accumulate else 'stayed'}"
            assert not torch.equal(st['grad_avg'], old['grad_avg']) and st['step'] == old['step'] + 1, 'the state did not take the gradient in'
    handle.remove()

def test_learner_optimizer_accumulation():
    "GradientRelease(accumulate=n) in a Learner: the weights step on every n-th batch and on an epoch's last; each batch counts as a step of the state; a bad n is refused where it is given"
    from fastopt.digits import digits_learner
    class Moves(Callback):
        order = 100
        def before_batch(self): self.w = next(self.learn.model.parameters()).detach().clone()
        def after_batch(self):
            if self.training: self.moved.append(not torch.equal(self.w, next(self.learn.model.parameters())))
    moves = Moves(); moves.moved = []
    learn = digits_learner(fastopt.Adam, cbs=[GradientRelease(accumulate=4), moves])
    fit(learn, 1, 1e-2)
    n = len(moves.moved)
    assert n > 8 and moves.moved == [(i + 1) % 4 == 0 or i == n - 1 for i in range(n)]
    assert learn.opt.state[next(learn.model.parameters())]['step'] == n
    for bad in (0, 2.5, True, '4'):
        with pytest.raises(ValueError, match=f"Invalid accumulate: {bad!r}"): GradientRelease(accumulate=bad)

@pytest.mark.parametrize('cls,kw', [('AdamW', dict(lr=1e-2, weight_decay=0.1)), ('SGD', dict(lr=1e-2, momentum=0.))], ids=['AdamW', 'SGD-momentum-later'])
def test_torch_optim_classes_release(cls, kw):
    "A `fastopt.optim` class under release_gradients equals it stepping normally, bit for bit: a StepLR schedule, a `maximize` group, and SGD's momentum turned on after construction (the class builds its optimizer again)"
    import fastopt.optim as O
    def run(release):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = getattr(O, cls)([{'params': m[0].parameters()}, {'params': m[2].parameters(), 'maximize': True, 'lr': 3e-3}], **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        handle = release_gradients(opt) if release else None
        g = torch.Generator().manual_seed(1)
        for i in range(4):
            if i == 2 and cls == 'SGD':
                for pg in opt.param_groups: pg['momentum'] = 0.9
            m(torch.randn(5, 4, generator=g)).square().mean().backward()
            if release: assert all(p.grad is None for p in m.parameters())
            opt.step(); opt.zero_grad(); sched.step()
        if handle: handle.remove()
        return [p.detach().clone() for p in m.parameters()], opt
    (a,_),(b,opt) = run(False),run(True)
    for i,(p,q) in enumerate(zip(a, b)): assert torch.equal(p, q), f"parameter {i} differs with release"
    assert opt.fastai_optimizer.fused == 'auto', 'the class did not get its fused setting back'

"""fastopt.optim: each class against torch.optim (where torch has the algorithm) under six torch schedulers, against its
fastopt builder, its state dict through torch.save, eager against fused, and torch's Optimizer API (closure, hooks,
zero_grad, add_param_group, maximize, errors). Float64, tiny tensors."""
import copy, io, math
from functools import partial
import pytest
import torch
from torch.optim import lr_scheduler as S
import fastopt
import fastopt.optim as fo
from fastopt.core import Optimizer
from fastopt.testing import kit_params, kit_grads

STEPS = 50

def torch_params(shapes=((4, 3), (3,), (2, 2), (5,)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]

def groups(ps, lr):
    "Two groups: weights with weight decay, then the last tensor at half the rate without decay"
    return [{'params': ps[:-1]}, {'params': ps[-1:], 'lr': lr / 2, 'weight_decay': 0.}]

def grads(ps, steps=STEPS, seed=1):
    "A gradient per parameter and step; the third parameter has none every third step"
    g = torch.Generator().manual_seed(seed)
    return [[None if (i == 2 and t % 3 == 2) else torch.randn(p.shape, generator=g, dtype=p.dtype) for i,p in enumerate(ps)] for t in range(steps)]

SCHEDULERS = {
    'StepLR': lambda o: S.StepLR(o, step_size=10, gamma=0.5),
    'OneCycleLR': lambda o: S.OneCycleLR(o, max_lr=[g['lr'] for g in o.param_groups], total_steps=STEPS, cycle_momentum=True),
    'CosineAnnealingWarmRestarts': lambda o: S.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2, eta_min=1e-4),
    'LambdaLR': lambda o: S.LambdaLR(o, lambda t: 1 / (1 + 0.1 * t)),
    'SequentialLR': lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=10), S.ExponentialLR(o, gamma=0.95)], milestones=[10]),
    'ReduceLROnPlateau': lambda o: S.ReduceLROnPlateau(o, patience=2, factor=0.5),
}

# (name, ours, torch's): the same arguments on both sides
TORCH_CASES = [
    ('SGD', partial(fo.SGD, lr=1e-2, momentum=0.9, weight_decay=0.1), partial(torch.optim.SGD, lr=1e-2, momentum=0.9, weight_decay=0.1)),
    ('SGD-no-momentum', partial(fo.SGD, lr=1e-2, weight_decay=0.1), partial(torch.optim.SGD, lr=1e-2, weight_decay=0.1)),
    ('RMSProp', partial(fo.RMSProp, lr=1e-2, weight_decay=0.1), partial(torch.optim.RMSprop, lr=1e-2, weight_decay=0.1)),
    ('Adam', partial(fo.Adam, lr=1e-2, weight_decay=0.1), partial(torch.optim.Adam, lr=1e-2, weight_decay=0.1)),
    ('Adam-decoupled', partial(fo.Adam, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     partial(torch.optim.Adam, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ('AdamW', partial(fo.AdamW, lr=1e-2, betas=(0.8, 0.99), eps=1e-6), partial(torch.optim.AdamW, lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    ('AMSGrad', partial(fo.AMSGrad, lr=1e-2), partial(torch.optim.AdamW, lr=1e-2, amsgrad=True)),
    ('AdamW-amsgrad', partial(fo.AdamW, lr=1e-2, amsgrad=True), partial(torch.optim.AdamW, lr=1e-2, amsgrad=True)),
    # torch adds ε to √v before the bias correction, fastai to √v̂: equal once ε is negligible
    ('RAdam', partial(fo.RAdam, lr=1e-2, eps=1e-12, weight_decay=0.1), partial(torch.optim.RAdam, lr=1e-2, eps=1e-12, weight_decay=0.1)),
    ('RAdam-decoupled', partial(fo.RAdam, lr=1e-2, eps=1e-12, weight_decay=0.1, decoupled_weight_decay=True),
     partial(torch.optim.RAdam, lr=1e-2, eps=1e-12, weight_decay=0.1, decoupled_weight_decay=True)),
    ('Muon', partial(fo.Muon, lr=2e-2), partial(torch.optim.Muon, lr=2e-2)),
    ('Muon-match-rms', partial(fo.Muon, lr=2e-2, nesterov=False, adjust_lr_fn='match_rms_adamw'),
     partial(torch.optim.Muon, lr=2e-2, nesterov=False, adjust_lr_fn='match_rms_adamw')),
]
MATRICES = ((4, 3), (3, 5), (6, 6), (2, 4))

@pytest.mark.parametrize('sched', list(SCHEDULERS))
@pytest.mark.parametrize('name,ours,theirs', TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_same_trajectory_as_torch_optim(name, ours, theirs, sched):
    "50 float64 steps, two groups, a parameter that misses every third gradient, the scheduler driving param_groups: within 1e-6 of torch.optim"
    shapes = MATRICES if name.startswith('Muon') else ((4, 3), (3,), (2, 2), (5,))
    make = SCHEDULERS[sched]
    if name == 'RMSProp' and sched == 'OneCycleLR':   # fastai's RMSProp momentum averages gradients, torch's the normalized steps: cycle lr only
        make = lambda o: S.OneCycleLR(o, max_lr=[g['lr'] for g in o.param_groups], total_steps=STEPS, cycle_momentum=False)
    a, b = torch_params(shapes), torch_params(shapes)
    gs = grads(a)
    mine, opt = run_with(ours, make, sched, a, gs)
    ref, ropt = run_with(theirs, make, sched, b, gs)
    for x,y in zip(mine, ref): torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
    assert [g['lr'] for g in opt.param_groups] == [g['lr'] for g in ropt.param_groups]
    assert max((x - p0).abs().max().item() for x,p0 in zip(mine, torch_params(shapes))) > 1e-3   # it moved

def run_with(make_opt, make_sched, sched_name, ps, gs):
    opt = make_opt(groups(ps, 1e-2))
    sched = make_sched(opt)
    for step_grads in gs:
        for p,g in zip(ps, step_grads): p.grad = None if g is None else g.clone()
        opt.step()
        if sched_name == 'ReduceLROnPlateau': sched.step(1.0)
        else: sched.step()
    return [p.detach().clone() for p in ps], opt

def test_torch_comparison_can_fail():
    "The comparison above is not vacuous: torch's RAdam with its default ε (placed differently) is caught"
    a, b = torch_params(), torch_params()
    gs = grads(a)
    mine, _ = run_with(partial(fo.RAdam, lr=1e-2), SCHEDULERS['StepLR'], 'StepLR', a, gs)
    ref, _ = run_with(partial(torch.optim.RAdam, lr=1e-2, eps=1e-3), SCHEDULERS['StepLR'], 'StepLR', b, gs)
    with pytest.raises(AssertionError): [torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9) for x,y in zip(mine, ref)]

# ---------------------------------------------------------------- every class against its fastopt builder

B = dict(lr=1e-2, weight_decay=0.1)   # what the fastopt-only classes get; their builders get lr and wd=0.1 with their own defaults
# name: (the class's arguments, the builder, the builder's equivalent arguments)
EQUIVALENTS = {
    'Adam': (dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.1), fastopt.Adam, dict(lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.1, decouple_wd=False)),
    'AdamW': (B, fastopt.Adam, dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.1, decouple_wd=True)),
    'AMSGrad': (dict(lr=1e-2), fastopt.AMSGrad, dict(lr=1e-2, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=1e-2)),
    'RAdam': (dict(B, decoupled_weight_decay=True), fastopt.RAdam, dict(lr=1e-2, sqr_mom=0.999, eps=1e-8, wd=0.1, decouple_wd=True)),
    'SGD': (dict(B, momentum=0.9), fastopt.SGD, dict(lr=1e-2, mom=0.9, wd=0.1, decouple_wd=False)),
    'RMSProp': (dict(B, alpha=0.9, momentum=0.5, eps=1e-6), fastopt.RMSProp, dict(lr=1e-2, sqr_mom=0.9, mom=0.5, eps=1e-6, wd=0.1, decouple_wd=False)),
    'Muon': (B, fastopt.Muon, dict(lr=1e-2, wd=0.1)),
    'Lion': (dict(B, betas=(0.95, 0.98)), fastopt.Lion, dict(lr=1e-2, wd=0.1, mom=0.95, avg_mom=0.98)),
    'Lamb': (dict(B, trust_clip=None, trust_wd=True), fastopt.Lamb, dict(lr=1e-2, wd=0.1, trust_clip=None, trust_wd=True)),
    'QHAdam': (dict(B, nu_1=0.5), fastopt.QHAdam, dict(lr=1e-2, wd=0.1, nu_1=0.5)),
    'Larc': (dict(B, clip=False), fastopt.Larc, dict(lr=1e-2, wd=0.1, clip=False)),
    **{n: (B, getattr(fastopt, n), dict(lr=1e-2, wd=0.1)) for n in ('SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'AdamAWD', 'UM', 'PreLamb', 'DuvAdam',
                                                                  'SUAdam', 'BAdam', 'ADOPT', 'ScheduleFreeAdamW')},
}

def test_every_class_is_covered():
    assert set(EQUIVALENTS) == set(fo.optimizers) and len(fo.optimizers) == 23
    assert all(issubclass(c, torch.optim.Optimizer) for c in fo.optimizers.values())

def schedule(t):
    "The group rates and momentum of step `t`, changing every step as a scheduler would"
    return [1e-2 * (1 + 0.1 * (t % 3)), 5e-3 * (1 + 0.1 * (t % 3))], 1 - 0.1 * (1 + 0.02 * (t % 2))

def set_torch_groups(opt, t):
    lrs, mom = schedule(t)
    for g,lr in zip(opt.param_groups, lrs):
        g['lr'] = lr
        if 'betas' in g: g['betas'] = (mom, *g['betas'][1:])
        elif 'momentum' in g: g['momentum'] = mom

def set_fastai_hypers(opt, t):
    lrs, mom = schedule(t)
    opt.set_hyper('lr', lrs)
    opt.set_hyper('mom', mom)

def step_through(opt, params, gs, set_values, start=0):
    flat = [p for pg in params for p in pg]
    for t,step_grads in enumerate(gs, start):
        set_values(opt, t)
        for p,g in zip(flat, step_grads): p.grad = None if g is None else g.clone()
        opt.step()
    return opt

def torch_groups(params): return [{'params': pg} for pg in params]

def make_class(name, params, **kw):
    opt = fo.optimizers[name](torch_groups(params), **{**EQUIVALENTS[name][0], **kw})
    opt.state[params[1][0]]['do_wd'] = False   # the bias, as Learner(wd_bn_bias=False) marks it
    return opt

@pytest.mark.parametrize('name', list(EQUIVALENTS))
def test_same_trajectory_as_the_builder(name):
    "20 float64 steps on the kit's parameters (conv, matrix, 0-d, bias without decay, zeros, sometimes and never a gradient), lr and momentum changing every step: within 1e-12 of the fastopt builder"
    kw, builder, bkw = EQUIVALENTS[name]
    a, b = kit_params(), kit_params()
    gs = kit_grads(a, 20)
    ours = step_through(make_class(name, a, fused=False), a, gs, set_torch_groups)
    ref = builder(b, fused=False, **bkw)
    ref.state[b[1][0]]['do_wd'] = False
    step_through(ref, b, gs, set_fastai_hypers)
    for x,y in zip([p for pg in a for p in pg], [p for pg in b for p in pg]): torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    assert ours.fastai_optimizer.hypers == ref.hypers
    assert not torch.equal(a[0][1], kit_params()[0][1])

@pytest.mark.parametrize('name', list(EQUIVALENTS))
def test_state_dict_round_trip(name):
    "10 steps, state_dict through torch.save and torch.load(weights_only=True), loaded into a fresh instance over copies: 10 more steps equal the uninterrupted 20 bit for bit"
    straight, first = kit_params(), kit_params()
    gs = kit_grads(straight, 20)
    step_through(make_class(name, straight, fused=False), straight, gs, set_torch_groups)
    o1 = step_through(make_class(name, first, fused=False), first, gs[:10], set_torch_groups)
    buf = io.BytesIO(); torch.save(o1.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    resumed = [[p.detach().clone().requires_grad_() for p in pg] for pg in first]
    o2 = make_class(name, resumed, fused=False)
    o2.load_state_dict(sd)
    assert [{k: v for k,v in g.items() if k != 'params'} for g in o2.param_groups] == [{k: v for k,v in g.items() if k != 'params'} for g in o1.param_groups]
    for p,q in zip([p for pg in first for p in pg], [p for pg in resumed for p in pg]):
        assert o1.state[p].keys() == o2.state[q].keys()
        for k,v in o1.state[p].items():
            if isinstance(v, torch.Tensor): assert v.dtype == o2.state[q][k].dtype and torch.equal(v, o2.state[q][k]) and v is not o2.state[q][k], k
            else: assert v == o2.state[q][k], k
    step_through(o2, resumed, gs[10:], set_torch_groups, start=10)
    for x,y in zip([p for pg in resumed for p in pg], [p for pg in straight for p in pg]): assert torch.equal(x, y)

def test_state_dict_is_torch_format():
    ps = torch_params()
    opt = fo.Adam(groups(ps, 1e-2))
    for p in ps: p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {'state', 'param_groups'} and sorted(sd['state']) == [0, 1, 2, 3]
    assert [g['params'] for g in sd['param_groups']] == [[0, 1, 2], [3]] and [g['stepped'] for g in sd['param_groups']] == [[0, 1, 2], [0]]
    assert set(sd['state'][0]) == {'grad_avg', 'sqr_avg', 'step'} and sd['state'][0]['step'].dtype == torch.float64
    assert sd['param_groups'][1]['lr'] == 5e-3 and sd['param_groups'][0]['betas'] == (0.9, 0.999)

def test_load_keeps_every_dtype():
    "torch's load_state_dict casts floating state to the parameter's dtype: here a float64 count, a bfloat16 moment, uint8 codes and an int64 stay as saved"
    def coded_stat(p, codes=None, scale=None, count=None, **kwargs):
        if codes is None: codes, scale, count = torch.zeros(p.shape, dtype=torch.uint8), torch.zeros(p.shape, dtype=torch.bfloat16), torch.zeros((), dtype=torch.int64)
        codes.copy_((p.grad.abs() * 10).clamp(0, 255).to(torch.uint8)); scale.add_(p.grad.to(torch.bfloat16)); count.add_(1)
        return {'codes': codes, 'scale': scale, 'count': count}
    def coded_step(p, lr, codes, scale, **kwargs): p.data.sub_(lr * (codes.to(p.dtype) + scale.to(p.dtype)))
    def Coded(params, lr, fused=False): return Optimizer(params, [coded_stat, fastopt.core.step_count, coded_step], fused=fused, lr=lr)
    Cls = fo.torch_optimizer(Coded, 'Coded', defaults=dict(lr=1e-3))
    ps = [torch.randn(3, 2, requires_grad=True)]   # float32
    opt = Cls(ps)
    ps[0].grad = torch.randn(3, 2)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    fresh = Cls([ps[0].detach().clone().requires_grad_()])
    fresh.load_state_dict(sd)
    st = fresh.state[fresh.param_groups[0]['params'][0]]
    assert {k: v.dtype for k,v in st.items()} == dict(codes=torch.uint8, scale=torch.bfloat16, count=torch.int64, step=torch.float64)
    for k,v in st.items(): assert torch.equal(v, sd['state'][0][k])
    with pytest.raises(AssertionError):   # and torch's own load would have cast them
        t = torch.optim.SGD([torch.zeros(3, 2, requires_grad=True)])
        t.load_state_dict(sd)
        assert t.state[t.param_groups[0]['params'][0]]['scale'].dtype == torch.bfloat16

def test_schedule_free_mode_and_float64_state_survive_a_checkpoint():
    "float32 parameters: Schedule-Free's float64 lr_max and weight_sum, and its eval mode, come back as saved"
    ps = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = fo.ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=2)
    for _ in range(3):
        for p in ps: p.grad = torch.randn_like(p)
        opt.step()
    opt.eval()
    sd = copy.deepcopy(opt.state_dict())
    assert [g['train_mode'] for g in sd['param_groups']] == [False]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    fresh = fo.ScheduleFreeAdamW(qs, lr=1e-2, warmup_steps=2)
    fresh.load_state_dict(sd)
    assert not fresh.train_mode and 'train_mode' not in fresh.param_groups[0]
    assert fresh.state[qs[0]]['lr_max'].dtype == torch.float64 == fresh.state[qs[0]]['weight_sum'].dtype
    opt.train(); fresh.train()
    for p,q in zip(ps, qs): g = torch.randn_like(p); p.grad, q.grad = g, g.clone()
    opt.step(); fresh.step()
    for p,q in zip(ps, qs): assert torch.equal(p, q)

def test_load_refuses_what_does_not_fit_and_changes_nothing():
    ps = torch_params()
    opt = fo.Adam(groups(ps, 1e-2))
    for p in ps: p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match='different number of parameter groups'): opt.load_state_dict({**sd, 'param_groups': sd['param_groups'][:1]})
    other = fo.Adam(groups(torch_params(((3, 4), (3,), (2, 2), (5,))), 1e-2))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match='does not fit parameter 0'): other.load_state_dict(sd)
    assert other.state_dict() == before
    bad = copy.deepcopy(sd); bad['param_groups'][0]['betas'] = (1.5, 0.999)
    with pytest.raises(ValueError, match=r'betas\[0\]: 1.5'): opt.load_state_dict(bad)

def test_distributed_checkpoint_round_trip(tmp_path):
    "torch.distributed.checkpoint (one process): get_optimizer_state_dict, dcp.save, then dcp.load and set_optimizer_state_dict into a fresh model and optimizer; the runs continue bit for bit, the float64 step count stays float64"
    import warnings
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        return model, fo.ADOPT(model.parameters(), lr=1e-2, weight_decay=0.1)
    X, y = torch.randn(16, 4), torch.randn(16, 1)
    def steps(model, opt, n):
        for _ in range(n):
            opt.zero_grad(); torch.nn.functional.mse_loss(model(X), y).backward(); opt.step()
    model, opt = make()
    steps(model, opt, 3)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'torch.distributed is disabled')   # one process, as intended
        dcp.save({'model': get_model_state_dict(model), 'optim': get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
        steps(model, opt, 3)
        model2, opt2 = make()
        sd = {'model': get_model_state_dict(model2), 'optim': get_optimizer_state_dict(model2, opt2)}
        dcp.load(sd, checkpoint_id=tmp_path)
    set_model_state_dict(model2, sd['model']); set_optimizer_state_dict(model2, opt2, sd['optim'])
    st = opt2.state[model2[0].weight]
    assert st['grad_avg'].dtype == torch.float32 and st['step'].dtype == torch.float64 and int(st['step']) == 3
    steps(model2, opt2, 3)
    assert all(torch.equal(a, b) for a,b in zip(model.parameters(), model2.parameters()))

# ---------------------------------------------------------------- torch's Optimizer API

def test_errors_are_torch_types_and_name_the_value():
    ps = torch_params()
    for ours,theirs,kw,match in [(fo.Adam, torch.optim.Adam, dict(betas=(1.5, 0.999)), r'betas\[0\]: 1.5'),
                                 (fo.AdamW, torch.optim.AdamW, dict(betas=(0.9, -0.1)), r'betas\[1\]: -0.1'),
                                 (fo.SGD, torch.optim.SGD, dict(lr=-1.), 'lr: -1.0'),
                                 (fo.RMSProp, torch.optim.RMSprop, dict(weight_decay=-0.5), 'weight_decay: -0.5'),
                                 (fo.Adam, torch.optim.Adam, dict(eps=-1e-8), 'eps: -1e-08')]:
        with pytest.raises(ValueError): theirs(ps, **kw)
        with pytest.raises(ValueError, match=match): ours(ps, **kw)
    with pytest.raises(TypeError): torch.optim.Adam(ps, foo=1)
    with pytest.raises(TypeError, match="Adam.__init__.. got an unexpected keyword argument 'foo'"): fo.Adam(ps, foo=1)
    with pytest.raises(TypeError, match='unexpected keyword'): fo.Lamb(ps, lr=1e-3, mom=0.9)   # fastopt's name where the class takes torch's `betas`
    with pytest.raises(ValueError, match=r"Invalid betas: 0.9 \(expected 2 values"): fo.Adam(ps, betas=0.9)
    with pytest.raises(ValueError, match='empty parameter list'): fo.Adam([])
    with pytest.raises(TypeError, match='iterable of Tensors'): fo.Adam(ps[0])
    with pytest.raises(ValueError, match="Invalid decouple_wd: 'yes'"): fo.SGD(ps, decouple_wd='yes')
    opt = fo.Adam(ps)
    opt.param_groups[0]['betas'] = (0.9, 1.0)   # a bad value set later (by hand or a scheduler) is refused at the step
    with pytest.raises(ValueError, match=r'betas\[1\]: 1.0'): opt.step()

def test_closure_hooks_and_zero_grad():
    ps = torch_params()
    opt = fo.AdamW(ps, lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(('pre', o is opt, ps[0].detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(('post', o is opt, ps[0].detach().clone())))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, 'seen_by_hook': True})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k,v in sd.items() if k != 'seen_by_hook'})
    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in ps)
        loss.backward()
        return loss
    with torch.no_grad(): loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(sum((p0 ** 2).sum().item() for p0 in torch_params()))
    assert [c[:2] for c in calls] == [('pre', True), ('post', True)] and not torch.equal(calls[0][2], calls[1][2])
    sd = opt.state_dict()
    assert sd['seen_by_hook']
    opt.load_state_dict(sd)
    grads = [p.grad for p in ps]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p,g in zip(ps, grads))
    opt.zero_grad()
    assert all(p.grad is None for p in ps)

def test_maximize_matches_torch_and_leaves_the_gradient():
    "Adam with L2 decay (which changes the gradient it steps with) and maximize=True: torch's trajectory, the caller's gradients untouched"
    a, b = torch_params(), torch_params()
    ours, theirs = fo.Adam(a, lr=1e-2, weight_decay=0.1, maximize=True), torch.optim.Adam(b, lr=1e-2, weight_decay=0.1, maximize=True)
    for gs in grads(a, 10):
        for p,q,g in zip(a, b, gs): p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        ours.step(); theirs.step()
        for p,g in zip(a, gs): assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    for p,q in zip(a, b): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)

def test_add_param_group_as_torch():
    "A group added later steps with its own values; SGD built without momentum starts using it when a group asks for it, as torch's does"
    a, b = torch_params(), torch_params()
    ours, theirs = fo.SGD(a[:2], lr=1e-2), torch.optim.SGD(b[:2], lr=1e-2)
    gs = grads(a, 12)
    for t,step_grads in enumerate(gs):
        if t == 4:
            ours.add_param_group({'params': a[2:], 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.01})
            theirs.add_param_group({'params': b[2:], 'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.01})
        for p,q,g in zip(a, b, step_grads): p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        ours.step(); theirs.step()
    for p,q in zip(a, b): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    assert len(ours.fastai_optimizer.param_lists) == 2 and 'grad_avg' in ours.state[a[2]]
    with pytest.raises(ValueError, match='lr: -1'): ours.add_param_group({'params': [torch.zeros(2, requires_grad=True)], 'lr': -1})
    with pytest.raises(ValueError, match='more than one parameter group'): ours.add_param_group({'params': [a[0]]})
    assert len(ours.param_groups) == len(ours.fastai_optimizer.param_lists) == len(ours.fastai_optimizer.hypers) == 2

def test_repr_copies_tensor_lr_and_named_parameters():
    model = torch.nn.Linear(3, 2).double()
    opt = fo.Lamb(model.named_parameters(), lr=torch.tensor(1e-2), weight_decay=0.1)
    text = repr(opt)
    assert text.startswith("Lamb (decouple_wd=True, trust_wd=False, fused='auto', kahan_sum=None, stochastic_round=False, state_dtype=None) (") and 'betas: (0.9, 0.99)' in text and 'weight_decay: 0.1' in text
    assert opt.param_groups[0]['param_names'] == ['weight', 'bias']
    x = torch.randn(5, 3, dtype=torch.float64)
    model(x).sum().backward()
    opt.step()
    twin = copy.deepcopy(opt)
    import pickle
    pickled = pickle.loads(pickle.dumps(opt))
    for o in (opt, twin, pickled):
        for p in o.param_groups[0]['params']: p.grad = torch.ones_like(p)
        o.step()
    for p,q,r in zip(opt.param_groups[0]['params'], twin.param_groups[0]['params'], pickled.param_groups[0]['params']):
        assert torch.equal(p, q) and torch.equal(p, r) and p is not q

def test_tensor_lr_changed_in_place_by_a_scheduler():
    "torch's schedulers fill_ a tensor lr in place: each step still reads the current value, as torch.optim's do"
    a, b = torch_params(), torch_params()
    lr = lambda: torch.tensor(1e-2, dtype=torch.float64)
    ours, theirs = fo.AdamW(a, lr=lr()), torch.optim.AdamW(b, lr=lr())
    s1, s2 = S.StepLR(ours, step_size=2, gamma=0.1), S.StepLR(theirs, step_size=2, gamma=0.1)
    for gs in grads(a, 8):
        for p,q,g in zip(a, b, gs): p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        ours.step(); theirs.step(); s1.step(); s2.step()
    assert isinstance(ours.param_groups[0]['lr'], torch.Tensor) and float(ours.param_groups[0]['lr']) == pytest.approx(1e-6)
    for p,q in zip(a, b): torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)

def test_swa_utils():
    model = torch.nn.Linear(3, 1).double()
    opt = fo.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swa_model, swa = torch.optim.swa_utils.AveragedModel(model), torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    for _ in range(3):
        model(torch.randn(4, 3, dtype=torch.float64)).pow(2).mean().backward()
        opt.step(); opt.zero_grad(); swa_model.update_parameters(model); swa.step()
    assert opt.param_groups[0]['lr'] == pytest.approx(0.05) and int(swa_model.n_averaged) == 3

# ---------------------------------------------------------------- the fused path

def test_fused_equals_eager_and_resumes_bit_for_bit():
    "One compile: Adam fused on flat buffers equals eager within 1e-10 (a parameter missing every third gradient, lr per group); a fused run resumed from torch.save continues bit for bit"
    fused_groups = lambda ps: [{'params': ps[:2]}, {'params': ps[2:], 'lr': 5e-3}]
    eager, fused, first = torch_params(), torch_params(), torch_params()
    gs = grads(eager, 8)
    def steps(opt, ps, gs):
        for step_grads in gs:
            for g in opt.param_groups: g['lr'] *= 0.9
            for p,g in zip(ps, step_grads): p.grad = None if g is None else g.clone()
            opt.step()
        return opt
    steps(fo.AdamW(fused_groups(eager), lr=1e-2, fused=False), eager, gs)
    opt = steps(fo.AdamW(fused_groups(fused), lr=1e-2, fused=True), fused, gs)
    assert opt.fastai_optimizer.fused is True   # no fallback to eager
    for x,y in zip(fused, eager): torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    o1 = steps(fo.AdamW(fused_groups(first), lr=1e-2, fused=True), first, gs[:4])
    assert o1.state[first[0]]['grad_avg']._base is not None   # the state is a view into a flat buffer
    buf = io.BytesIO(); torch.save(o1.state_dict(), buf); buf.seek(0)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    o2 = fo.AdamW(fused_groups(resumed), lr=1e-2, fused=True)
    o2.load_state_dict(torch.load(buf, weights_only=True))
    steps(o2, resumed, gs[4:])
    for x,y in zip(resumed, fused): assert torch.equal(x, y)

# ---------------------------------------------------------------- DDP and FSDP2

def test_under_ddp_and_fsdp2():
    "Both gloo ranks bit-identical and equal to one process averaging the half-batch gradients (rtol 1e-10): torch classes over plain, DDP and DTensor (FSDP2) parameters"
    from fastopt.testing import distributed_equality
    cases = {'AdamW-ddp': (fo.AdamW, 'ddp'), 'Muon-fsdp': (fo.Muon, 'fsdp'), 'Lamb-fsdp': (fo.Lamb, 'fsdp')}
    res = distributed_equality(cases, lr=1e-2)
    assert res == {n: None for n in cases}, res

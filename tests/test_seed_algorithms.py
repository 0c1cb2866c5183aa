"""The ten seed-derived algorithms against an independent transcription of ../shared/ALGORITHMS.md (tests/reference.py),
in float64 over 60 steps with a zero-initialised parameter, a parameter that misses every third gradient, a do_wd=False
bias and a conv weight, in both weight-decay modes; plus their guards and the size of their state."""
import math
import pytest
import torch
import fastopt
from helpers import run_fastai_style, assert_params_close, make_params
from reference import reference

H = dict(lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.1)

# name -> (builder, the hypers it takes among H, extra hypers passed to both sides)
ALGOS = {
    'sadam':      (fastopt.SAdam,      ('lr', 'mom', 'sqr_mom', 'wd'), {}),
    'sradam':     (fastopt.SRAdam,     ('lr', 'mom', 'sqr_mom', 'wd'), {}),
    'adamgc':     (fastopt.AdamGC,     ('lr', 'mom', 'sqr_mom', 'eps', 'wd'), {}),
    'stableadam': (fastopt.StableAdam, ('lr', 'mom', 'sqr_mom', 'eps', 'wd'), {}),
    'adamawd':    (fastopt.AdamAWD,    ('lr', 'mom', 'sqr_mom', 'eps'), {}),
    'um':         (fastopt.UM,         ('lr', 'mom', 'wd'), {}),
    'prelamb':    (fastopt.PreLamb,    ('lr', 'mom', 'wd'), {}),
    'duvadam':    (fastopt.DuvAdam,    ('lr', 'mom', 'sqr_mom', 'wd'), {}),
    'suadam':     (fastopt.SUAdam,     ('lr', 'mom', 'sqr_mom', 'wd'), {}),
    'badam':      (fastopt.BAdam,      ('lr', 'mom', 'sqr_mom', 'wd'), {}),
}
EXTRA = [('sadam', dict(beta=5.)), ('sradam', dict(rho_min=5., beta=5.)), ('adamgc', dict(gc_conv_only=False)),
         ('stableadam', dict(scale_invariant=lambda p: p.ndim >= 2)), ('badam', dict(beta=5.)),
         ('duvadam', dict(ratio_clip=2.)), ('suadam', dict(ratio_clip=1.5))]

def ours(name, decouple_wd=True, **extra):
    builder, takes, _ = ALGOS[name]
    kw = {k: H[k] for k in takes}
    if 'wd' in takes: kw['decouple_wd'] = decouple_wd
    return run_fastai_style(builder, **kw, **extra)

@pytest.mark.parametrize('decouple_wd', [True, False], ids=['decoupled', 'l2'])
@pytest.mark.parametrize('name', list(ALGOS))
def test_matches_transcription(name, decouple_wd):
    assert_params_close(ours(name, decouple_wd), reference(name, decouple_wd=decouple_wd, **H))

@pytest.mark.parametrize('name,extra', EXTRA, ids=[f'{n}-{list(e)[0]}' for n,e in EXTRA])
def test_matches_transcription_with_other_hypers(name, extra):
    "Non-default hypers change the result, and still agree with the transcription (a small ratio_clip makes the guard fire)"
    res = ours(name, **extra)
    assert_params_close(res, reference(name, **H, **extra))
    default = ours(name)
    assert any(not torch.allclose(res[k], default[k]) for k in res)

@pytest.mark.parametrize('name', list(ALGOS))
def test_every_parameter_moves(name):
    "Including the all-zero one: seed bug 5 left zero-initialised parameters stuck"
    res, start = ours(name), make_params()
    for k in res: assert not torch.equal(res[k], start[k]), k

# ---- Guards: finite gradients never put inf or NaN into parameters or state

BUILDERS = [fastopt.SAdam, fastopt.SRAdam, fastopt.AdamGC, fastopt.StableAdam, fastopt.AdamAWD, fastopt.UM,
            fastopt.PreLamb, fastopt.DuvAdam, fastopt.SUAdam, fastopt.BAdam, fastopt.Adam, fastopt.AMSGrad,
            fastopt.RAdam, fastopt.Lamb]

def all_finite(opt, params):
    tensors = list(params) + [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in tensors)

@pytest.mark.parametrize('builder', BUILDERS, ids=lambda b: b.__name__)
def test_zero_parameters_and_zero_gradients_stay_finite(builder):
    params = [torch.zeros(3, 2, 2, 2, requires_grad=True), torch.zeros(4, requires_grad=True), torch.randn(3, 3, requires_grad=True)]
    opt = builder(params, lr=1e-2)
    for t in range(12):
        for p in params: p.grad = torch.zeros_like(p) if t % 2 else torch.randn_like(p)
        opt.step()
        assert all_finite(opt, params), t
    for t in range(5):   # only zero gradients from the start
        q = [torch.zeros(5, requires_grad=True)]
        o = builder(q, lr=1e-2)
        q[0].grad = torch.zeros(5)
        o.step()
        assert all_finite(o, q)

@pytest.mark.parametrize('builder', [fastopt.DuvAdam, fastopt.SUAdam], ids=lambda b: b.__name__)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_tiny_momentum_guard(builder, dtype):
    "m_{t-1} so small that g/m_{t-1} overflows: the deviation is capped at ratio_clip and the element keeps moving"
    tiny = torch.finfo(dtype).tiny / 2**10   # a subnormal
    p = torch.ones(3, dtype=dtype, requires_grad=True)
    opt = builder([p], lr=1e-2)
    opt.state[p] = dict(grad_avg=torch.tensor([tiny, 0.5, 0.], dtype=dtype), ratio_avg=torch.zeros(3, dtype=dtype),
                        step=torch.tensor(1., dtype=dtype))
    p.grad = torch.tensor([0.7, 0.5, 0.3], dtype=dtype)
    opt.step()
    dev = opt.state[p]['ratio_avg'] / (1 - opt.hypers[0]['sqr_mom'])
    power = 2 if builder is fastopt.DuvAdam else 1
    assert dev[0].item() == pytest.approx(1e3**power, rel=1e-5)   # the guard fired on the tiny element
    assert dev[2].item() == 0.                                     # m = 0: ratio 1
    assert all_finite(opt, [p])
    before = p.detach().clone()
    for _ in range(3):
        p.grad = torch.tensor([0.7, 0.5, 0.3], dtype=dtype)
        opt.step()
    assert (p < before).all()

def test_badam_zero_previous_update_guard():
    "lr = 0 makes every update zero, so a = mean|u_prev| = 0 from step 2 on: Φ is 0, not 0/0"
    p = torch.randn(4, requires_grad=True)
    opt = fastopt.BAdam([p], lr=0.)
    for _ in range(4):
        p.grad = torch.randn(4)
        opt.step()
    assert torch.equal(opt.state[p]['phi_avg'], torch.zeros(4))
    assert all_finite(opt, [p])
    opt.set_hyper('lr', 1e-2)      # and the optimizer recovers once it takes real steps
    for _ in range(3):
        p.grad = torch.randn(4)
        opt.step()
    assert opt.state[p]['phi_avg'].abs().sum() > 0 and all_finite(opt, [p])

def test_sign_clamp():
    x, a = torch.tensor([3., -0.5, 0., 0.2, -4.]), torch.tensor(1.)
    assert torch.equal(fastopt.sign_clamp(x, a), torch.tensor([3., -1., 1., 1., -4.]))

# ---- State: what each optimizer keeps per parameter

STATE_TENSORS = dict(Adam=2, AMSGrad=3, RAdam=2, Lamb=2, SAdam=2, SRAdam=2, AdamGC=2, StableAdam=2, AdamAWD=2,
                     UM=1, PreLamb=1, DuvAdam=2, SUAdam=2, BAdam=4)

@pytest.mark.parametrize('name,n', list(STATE_TENSORS.items()))
def test_state_tensors_per_parameter(name, n):
    "Tensors of the parameter's size in the state (besides the 0-d step); no optimizer but BAdam keeps an update"
    w, b = torch.randn(3, 2, 2, 2, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = getattr(fastopt, name)([w, b], lr=1e-2)
    for _ in range(2):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    for p in (w, b):
        st = opt.state[p]
        full = [k for k,v in st.items() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        assert len(full) == n, (name, full)
        assert st['step'].ndim == 0 and st['step'].item() == 2
        assert 'update' not in st
        assert ('prev_update' in st) == (name == 'BAdam')
    if name in ('StableAdam', 'AdamAWD'):
        assert opt.state[w]['init_rms'].shape == (3, 1, 1, 1) and 'init_rms' not in opt.state[b]

def test_badam_stays_finite_when_noise_collapses_its_updates():
    "Under gradient noise BAdam's updates shrink geometrically until Φ = Δg/u overflows; the guard keeps the state finite"
    torch.manual_seed(0)
    x, H = torch.randn(10, requires_grad=True), torch.linspace(0.1, 2, 10)
    opt = fastopt.BAdam([x], lr=1e-2)   # collapses within about 230 steps on this problem
    fired = False
    for _ in range(300):
        x.grad = H * x.detach() + 0.1 * torch.randn(10)
        u = opt.state[x].get('prev_update')
        if u is not None and not torch.isfinite((x.grad - opt.state[x]['prev_grad']) / fastopt.sign_clamp(u, u.abs().mean())).all(): fired = True
        opt.step()
        assert all_finite(opt, [x])
    assert fired, 'the overflow case never happened, so this test does not exercise the guard'

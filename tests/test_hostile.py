"""Awkward parameters and gradients, in both execution modes, for all 18 optimizers.

- 0-d, empty and non-contiguous parameters step exactly as their ordinary equivalents (a 1-element vector, nothing, a
  contiguous copy) within 1e-6; fused equals eager within rtol 1e-5, atol 1e-6 (float32).
- float16/bfloat16 parameters: the state lives in the parameter's dtype (the step count stays float64), and three steps
  agree with a float32 run on the same values within 3 steps' worth of rounding (3 × 2 ulps of the largest entry).
- A group whose parameters never get a gradient is left bit-identical, with no state.
- NaN or inf in a gradient never raises: it reaches that parameter (and its state) and no other, bit for bit; SUAdam steps
  by the gradient's sign, which is ±1 for ±inf, so only a NaN reaches its parameter there.
"""
import math
from functools import partial
import pytest
import torch
import fastopt
from helpers import SEED_OPTIMIZERS as optimizers

FASTAI_NAMESAKES = dict(SGD=dict(mom=0.9), RMSProp={}, QHAdam={}, Larc={})
ALL = {**{n: {} for n in optimizers}, **FASTAI_NAMESAKES}
ALL['BAdam'] = dict(beta=5.)
MODES = [False, True]
MODE_IDS = ['eager', 'fused']

def build(name, params, fused, **kw):
    return getattr(fastopt, name)(params, lr=1e-2, fused=fused, **{**ALL[name], **kw})

def run(name, params, grads, fused, **kw):
    "Step `name` over `params` with `grads[t][i]` (None: no grad) and return the optimizer"
    opt = build(name, params, fused, **kw)
    for gs in grads:
        for p,g in zip(params, gs): p.grad = None if g is None else g.clone()
        opt.step()
    return opt

def random_grads(shapes, n=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(n)]

def odd_params():
    "A 0-d parameter, two empty ones, a transposed (non-contiguous) leaf, and an ordinary conv weight"
    g = torch.Generator().manual_seed(0)
    return [torch.randn((), generator=g).requires_grad_(), torch.zeros(0, requires_grad=True), torch.zeros(3, 0, requires_grad=True),
            torch.randn(5, 4, generator=g).t().requires_grad_(), torch.randn(4, 2, 3, 3, generator=g).requires_grad_()]

def plain_equivalents(ps):
    "The same values as ordinary parameters: the 0-d one as a 1-vector, the transposed one contiguous, the empty ones dropped"
    return [ps[0].detach().reshape(1).clone().requires_grad_(), ps[3].detach().contiguous().requires_grad_(),
            ps[4].detach().clone().requires_grad_()]

@pytest.mark.parametrize('name', list(ALL))
def test_0d_empty_and_noncontiguous_parameters(name, fused=False):
    ps = odd_params()
    assert not ps[3].is_contiguous()
    grads = random_grads([p.shape for p in ps])
    opt = run(name, ps, grads, fused)
    assert opt.fused == fused, 'the fused path fell back to eager'
    assert [p.shape for p in ps] == [p.shape for p in odd_params()] and not ps[3].is_contiguous()
    for p in ps:
        for k,v in opt.state[p].items():
            if torch.is_tensor(v) and v.ndim: assert v.shape[-1] == 1 or v.shape == p.shape, (k, v.shape)
    qs = plain_equivalents(odd_params())
    run(name, qs, [[g[0].reshape(1), g[3].contiguous(), g[4]] for g in grads], fused=False)
    for p,q in zip([ps[0].reshape(1), ps[3], ps[4]], qs):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5 if fused else 1e-6, atol=1e-6)

@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('name', list(ALL))
def test_half_precision_parameters(name, dtype, fused=False):
    "Element-wise state stays in the parameter's dtype (per-channel values in the float32 they are computed in); the result is the float32 result up to the rounding of three steps"
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(6, 5, generator=g).to(dtype), torch.randn(4, 2, 3, 3, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype)]
    half = [t.clone().requires_grad_() for t in init]
    full = [t.float().requires_grad_() for t in init]
    grads = random_grads([t.shape for t in init], n=3, dtype=dtype)
    opt = run(name, half, grads, fused)
    assert opt.fused == fused, 'the fused path fell back to eager'
    run(name, full, [[g.float() for g in gs] for gs in grads], fused=False)
    for p,q in zip(half, full):
        assert p.dtype == dtype
        for k,v in opt.state[p].items():
            if torch.is_tensor(v): assert v.dtype == (torch.float64 if k == 'step' else dtype if v.shape == p.shape else torch.float32), (k, v.dtype)
        ulp = torch.finfo(dtype).eps * q.abs().max().item()
        torch.testing.assert_close(p.float(), q, rtol=0, atol=3 * 2 * ulp)

@pytest.mark.parametrize('name', list(ALL))
def test_group_that_never_gets_grads(name, fused=False):
    g = torch.Generator().manual_seed(0)
    live = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()]
    idle = [torch.randn(2, 2, generator=g).requires_grad_(), torch.randn(4, 2, 3, 3, generator=g).requires_grad_()]
    before = [p.detach().clone() for p in idle]
    opt = build(name, [live, idle], fused, wd=0.1) if name != 'AdamAWD' else build(name, [live, idle], fused)
    for gs in random_grads([p.shape for p in live]):
        for p,gr in zip(live, gs): p.grad = gr
        opt.step()
    assert opt.fused == fused
    for p,b in zip(idle, before): assert torch.equal(p, b) and not opt.state[p]
    assert all(opt.state[p] for p in live)

def nan_and_inf_run(name, fused, poison):
    "Five steps; on steps 2 and 4 parameter 0 gets a NaN entry and parameter 1 an inf entry, if `poison`"
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(4, 2, 3, 3, generator=g).requires_grad_(),
          torch.randn(6, generator=g).requires_grad_()]
    grads = random_grads([p.shape for p in ps])
    if poison:
        for t in (1, 3):
            grads[t][0][1, 2] = math.nan
            grads[t][1][0, 1, 1, 1] = -math.inf
    opt = run(name, ps, grads, fused)
    return ps, opt

@pytest.mark.parametrize('name', list(ALL))
def test_nan_and_inf_gradients_stay_in_their_parameter(name, fused=False):
    "fastopt does not inspect gradients (that would cost a device sync per step): a non-finite gradient reaches its parameter only"
    poisoned, opt = nan_and_inf_run(name, fused, poison=True)
    clean, _ = nan_and_inf_run(name, fused, poison=False)
    assert opt.fused == fused
    assert not torch.isfinite(poisoned[0]).all(), 'a NaN gradient must not vanish'
    if name == 'SUAdam': assert torch.isfinite(poisoned[1]).all()   # it steps by sign(g), and sign(-inf) = -1
    else: assert not torch.isfinite(poisoned[1]).all(), 'an infinite gradient must not vanish'
    assert torch.equal(poisoned[2], clean[2])

@pytest.mark.parametrize('fused', MODES, ids=MODE_IDS)
def test_mixed_dtypes_in_one_group(fused):
    "torch.optim's test_mixed_device_dtype on one device: float32 and float64 parameters in one group step as they would apart"
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g)]
    grads = [[torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g)] for _ in range(5)]
    ps = [t.clone().requires_grad_() for t in init]
    opt = run('Lamb', ps, grads, fused)
    apart = [run('Lamb', [t.clone().requires_grad_()], [[gs[i]] for gs in grads], False).param_lists[0][0] for i,t in enumerate(init)]
    assert opt.fused == fused
    for p,q in zip(ps, apart): assert p.dtype == q.dtype; torch.testing.assert_close(p, q)

def everything_at_once(name, fused, poison=True):
    "The cases above in one optimizer: odd float32 parameters with NaN/inf gradients, bfloat16 ones, and a group with no grads"
    g = torch.Generator().manual_seed(0)
    odd = odd_params()
    witness = torch.randn(6, generator=g).requires_grad_()
    half = [torch.randn(6, 5, generator=g).bfloat16().requires_grad_(), torch.randn(4, 2, 3, 3, generator=g).bfloat16().requires_grad_()]
    idle = [torch.randn(2, 2, generator=g).requires_grad_()]
    live = odd + [witness] + half
    grads = random_grads([p.shape for p in live])
    for gs in grads:
        for i,p in enumerate(half): gs[len(odd) + 1 + i] = gs[len(odd) + 1 + i].bfloat16()
    if poison:
        grads[1][3][1, 2] = math.nan
        grads[3][4][0, 1, 1, 1] = -math.inf
    opt = build(name, [odd + [witness], half, idle], fused)
    for gs in grads:
        for p,gr in zip(live, gs): p.grad = gr.clone()
        opt.step()
    return opt, live, idle

@pytest.mark.parametrize('name', list(ALL))
def test_fused_handles_all_of_it_like_eager(name):
    "The fused path on the cases above: same results as eager (NaN where eager has NaN), idle group untouched, NaN contained"
    opt, fused, idle = everything_at_once(name, True)
    assert opt.fused, 'the fused path fell back to eager'
    _, eager, _ = everything_at_once(name, False)
    for p,q in zip(fused, eager):
        assert p.dtype == q.dtype and p.shape == q.shape
        tol = dict(rtol=1e-5, atol=1e-6) if p.dtype == torch.float32 else dict(rtol=0, atol=2 * 5 * torch.finfo(p.dtype).eps * q.abs().max().item())
        torch.testing.assert_close(p, q, equal_nan=True, **tol)
    assert not opt.state[idle[0]]
    _, clean, _ = everything_at_once(name, True, poison=False)
    assert torch.equal(fused[5], clean[5]) and torch.equal(fused[6], clean[6]) and torch.equal(fused[7], clean[7])

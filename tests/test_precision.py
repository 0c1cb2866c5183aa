"""Low-precision weights and state (fastopt.precision, fastopt.lowbit) for every optimizer: Kahan compensation tracks
float32, 8-bit state is kept where it should be, fused steps equal eager ones, resuming is bit-identical, and bad
choices are refused with their value named before anything trains."""
import copy, io, math
from functools import partial

import pytest
import torch

import fastopt
from fastopt.precision import is_quantized, dequantize, state_nbytes, min_8bit_numel
from fastopt.lowbit import quantize_rows, dequantize_rows, QBLOCK
ALL_OPTIMIZERS = list(fastopt.__all__[:22])   # the 22 optimizers, as fastopt exports them

HYPERS = dict(SUAdam=dict(lr=0.3), BAdam=dict(lr=0.3, beta=5.), DuvAdam=dict(lr=0.3), SGD=dict(lr=0.1, mom=0.9), Larc=dict(lr=1.),
              Lion=dict(lr=1e-3), Muon=dict(lr=2e-2))
SHAPES = [(96, 64), (8, 4, 3, 3), (12,), (5000,)]   # two with 4096 or more values (8-bit state), a conv weight, a bias

def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.5).to(dtype).requires_grad_() for s in SHAPES]

def grads(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).bfloat16().float() for s in SHAPES] for _ in range(n)]   # bf16 values: every dtype steps on the same gradients

def run(name, dtype, steps=4, params=None, gs=None, **modes):
    ps = make(dtype) if params is None else params
    opt = getattr(fastopt, name)(ps, **{'lr': 1e-2, **HYPERS.get(name, {}), 'fused': False, **modes})
    for g in (grads(steps) if gs is None else gs):
        for p,x in zip(ps, g): p.grad = x.to(dtype)
        opt.step()
    return ps, opt

@pytest.mark.parametrize('name', ALL_OPTIMIZERS)
def test_kahan_tracks_float32(name):
    "bf16 weights with Kahan compensation and float32 state follow the float32 run from the same start within the compensation's resolution, far closer than rounding to nearest"
    start = make(torch.bfloat16)
    ref,_ = run(name, torch.float32, params=[p.detach().float().requires_grad_() for p in start])
    kahan,ko = run(name, torch.bfloat16, params=[p.detach().clone().requires_grad_() for p in start], state_dtype=torch.float32)
    near,_ = run(name, torch.bfloat16, params=[p.detach().clone().requires_grad_() for p in start], state_dtype=torch.float32, kahan_sum=False)
    for i,(r,k,n) in enumerate(zip(ref, kahan, near)):
        full = k.float() + ko.state[k]['weight_comp'].float()
        scale = r.abs().max().item()
        assert (full - r).abs().max().item() <= 2**-14 * scale, f"{name} parameter {i}: Kahan weight {((full - r).abs().max().item())} from float32"
        assert torch.isfinite(n.float()).all()
    moved = [(r - p.float()).abs().max().item() for r,p in zip(ref, start)]
    assert max(moved) > 2**-12, f"{name}: the float32 run hardly moved ({moved}), so the check above is empty"

MODES = {'bf16+kahan+8bit': (torch.bfloat16, dict(state_dtype='8bit')), 'bf16+sr': (torch.bfloat16, dict(stochastic_round=True)),
         'fp32+8bit': (torch.float32, dict(state_dtype='8bit')), 'fp32+bf16 state': (torch.float32, dict(state_dtype=torch.bfloat16))}

@pytest.mark.parametrize('name', ALL_OPTIMIZERS)
def test_state_kept_as_chosen(name):
    "Each mode keeps element-wise state as chosen (8-bit codes for parameters of 4096 values or more, float32 below), 0-d state exact, and the weights finite"
    for mode,(dtype,modes) in MODES.items():
        ps,opt = run(name, dtype, **modes)
        for p in ps:
            assert torch.isfinite(p.float()).all(), f"{name} {mode}: non-finite weights"
            assert p.dtype == dtype
            for k,v in opt.state[p].items():
                if is_quantized(v):
                    assert modes.get('state_dtype') == '8bit' and p.numel() >= min_8bit_numel, f"{name} {mode}: {k} quantized on {tuple(p.shape)}"
                    assert v['codes'].shape == p.shape and v['codes'].dtype == torch.uint8
                elif isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape == p.shape and k != 'weight_comp':
                    want = {'8bit': torch.float32}.get(modes.get('state_dtype'), modes.get('state_dtype') or p.dtype)
                    assert v.dtype == want, f"{name} {mode}: {k} of {tuple(p.shape)} kept as {v.dtype}, not {want}"
                    assert not (modes.get('state_dtype') == '8bit' and p.numel() >= min_8bit_numel), f"{name} {mode}: {k} of {tuple(p.shape)} not quantized"
            assert ('weight_comp' in opt.state[p]) == (dtype == torch.bfloat16 and not modes.get('stochastic_round'))
            assert ('round_count' in opt.state[p]) == bool(modes.get('stochastic_round'))

def test_8bit_state_bytes():
    "Adam's state: 8 bytes a value in float32, at most 2.1 with 8-bit state (codes and a 2-byte scale per 64 values)"
    w = torch.randn(256, 256, requires_grad=True)
    for state_dtype,lo,hi in ((None, 8, 8.01), ('8bit', 2.06, 2.1), (torch.bfloat16, 4, 4.01)):
        opt = fastopt.Adam([w], lr=1e-3, state_dtype=state_dtype, fused=False)
        w.grad = torch.randn_like(w); opt.step()
        assert lo <= state_nbytes(opt) <= hi, (state_dtype, state_nbytes(opt))

def test_eager_step_holds_one_parameters_state_twice():
    "An eager low-precision step makes each parameter's new state while its old one is still stored: that costs one parameter's state, not the group's"
    from fastopt.release import peak_tensor_memory
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(128, 128, generator=g).bfloat16().requires_grad_() for _ in range(32)]
    for modes in (dict(kahan_sum=True), dict(kahan_sum=True, state_dtype='8bit'), dict(stochastic_round=True), dict(stochastic_round=True, state_dtype='8bit')):
        opt = fastopt.Adam(ps, lr=1e-3, fused=False, **modes)
        for i in range(3):   # two steps make the state; the third is measured
            for p in ps: p.grad = torch.randn(p.shape, generator=g).bfloat16()
            if i < 2: opt.step()
        extra = (peak_tensor_memory(opt.step) - peak_tensor_memory(lambda: None)) / ps[0].numel()
        # one parameter's float32 working copies and new state: 24 to 42 bytes a value (measured); holding all 32 old states to the end, as the step once did, took 212 with Kahan
        assert extra < 64, f"{modes}: the step needed {extra:.1f} bytes per value of one parameter"

def test_quantizer_error_bounds():
    "Every value is within 1/16 of its block's largest magnitude (the clamp at the top code) and, above the signed format's subnormals (2^-6 of the scale), within 1/32 of itself"
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(500, QBLOCK, generator=g), torch.randn(500, QBLOCK, generator=g) ** 2 * 1e-8, torch.rand(500, QBLOCK, generator=g) * 1e6):
        y = dequantize_rows(*quantize_rows(x))
        m = x.abs().amax(1, keepdim=True)
        assert ((y - x).abs() <= m / 16).all()
        big = (x.abs() > 2**-5 * m) & (x.abs() < 1.9 * 2**torch.floor(torch.log2(m)))   # normal numbers, below the top code's clamp
        assert ((y - x).abs()[big] <= x.abs()[big] / 16 + 1e-30).all()
        if (x >= 0).all(): continue
        assert ((y - x).abs()[big] <= x.abs()[big] / 32 + 1e-30).all()   # signed: 4 mantissa bits

def resume(name, dtype, fused, backend='inductor', **modes):
    "Steps 1-2, a state dict through torch.save/torch.load(weights_only=True) into a fresh optimizer, steps 3-5: the same weights and state bytes as 5 steps"
    gs = grads(5)
    def opt_for(ps):
        opt = getattr(fastopt, name)(ps, **{'lr': 1e-2, **HYPERS.get(name, {}), 'fused': fused, **modes})
        opt.fused_backend = backend
        return opt
    def steps(ps, opt, gs):
        for g in gs:
            for p,x in zip(ps, g): p.grad = x.to(dtype)
            opt.step()
    ps = make(dtype); opt = opt_for(ps); steps(ps, opt, gs)
    qs = make(dtype); o1 = opt_for(qs); steps(qs, o1, gs[:2])
    buf = io.BytesIO(); torch.save(o1.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    rs = [q.detach().clone().requires_grad_() for q in qs]
    o2 = opt_for(rs); o2.load_state_dict(sd); steps(rs, o2, gs[2:])
    for i,(p,r) in enumerate(zip(ps, rs)):
        assert torch.equal(p, r), f"{name} resumed: parameter {i} differs"
        for k,v in opt.state[p].items():
            w = o2.state[r][k]
            if is_quantized(v): assert all(torch.equal(v[x], w[x]) for x in v), f"{name} resumed: {k} of parameter {i}"
            elif isinstance(v, torch.Tensor): assert torch.equal(v, w), f"{name} resumed: {k} of parameter {i}"

@pytest.mark.parametrize('name', ['Adam', 'BAdam'])
def test_resume_bit_identical_eager(name):
    resume(name, torch.bfloat16, False, state_dtype='8bit')
    resume(name, torch.bfloat16, False, stochastic_round=True, state_dtype='8bit')

def test_resume_bit_identical_fused():
    "A fused optimizer (dynamo's graph run by aot_eager: the layout and write-back logic; inductor's code is checked by test_fused_modes) resumes bit-identically in each mode"
    resume('Adam', torch.bfloat16, True, backend='aot_eager', state_dtype='8bit')
    resume('Adam', torch.bfloat16, True, backend='aot_eager', stochastic_round=True)

def fused_vs_eager(name, dtype, backend, steps=4, **modes):
    eager,eo = run(name, dtype, steps=steps, **modes)
    ps = make(dtype)
    opt = getattr(fastopt, name)(ps, **{'lr': 1e-2, **HYPERS.get(name, {}), 'fused': True, **modes})
    opt.fused_backend = backend
    for g in grads(steps):
        for p,x in zip(ps, g): p.grad = x.to(dtype)
        opt.step()
    assert opt.fused is True, f"{name}: the fused step failed and fell back to eager"
    return eager, ps, eo, opt

@pytest.mark.parametrize('name', ALL_OPTIMIZERS)
def test_fused_modes_traced(name):
    "Every optimizer's fused step (dynamo's graph, run by aot_eager) equals its eager one with bf16 weights, Kahan compensation and 8-bit state: all but 1% of the weights within a bf16 unit, the rest within an 8-bit code's share of the steps taken (float32 rounding can tip a value into the next code)"
    close_weights(name, *fused_vs_eager(name, torch.bfloat16, 'aot_eager', state_dtype='8bit')[:2])

def close_weights(name, eager, fused, steps=4):
    lr = {'lr': 1e-2, **HYPERS.get(name, {})}['lr']
    for i,(e,p) in enumerate(zip(eager, fused)):
        d = (e.float() - p.float()).abs()
        ulp = 2**-7 * e.float().abs().clamp_min(2**-10)
        assert (d > ulp).float().mean() <= 0.01, f"{name} parameter {i}: {(d > ulp).float().mean():.2%} of fused and eager weights differ by more than a bf16 unit"
        assert (d <= ulp + steps * lr / 8).all(), f"{name} parameter {i}: fused and eager weights differ by {d.max().item()}"

@pytest.mark.parametrize('name,modes', [('Adam', dict()), ('Adam', dict(stochastic_round=True, state_dtype='8bit')),
                                        ('Lamb', dict(state_dtype='8bit')), ('BAdam', dict(state_dtype='8bit'))])
def test_fused_modes(name, modes):
    "Compiled by inductor, the fused step equals the eager one: the weights as in `test_fused_modes_traced`, and with float state the compensated weights within the compensation's resolution (a compensation the compile left at zero fails)"
    eager,ps,eo,opt = fused_vs_eager(name, torch.bfloat16, 'inductor', **modes)
    assert opt._flat and any(opt._flat[0].buckets), f"{name}: nothing was laid out for the fused step"
    close_weights(name, eager, ps)
    for i,(e,p) in enumerate(zip(eager, ps)):
        if 'weight_comp' in eo.state[e] and 'state_dtype' not in modes:
            full_e = e.float() + eo.state[e]['weight_comp'].float(); full_p = p.float() + opt.state[p]['weight_comp'].float()
            assert ((full_e - full_p).abs() <= 2**-14 * full_e.abs().clamp_min(2**-10)).all(), f"{name} parameter {i}: compensated weights differ"
            assert opt.state[p]['weight_comp'].abs().max() > 0, "the fused step left the compensation at zero (casts not rounded)"

def test_bad_choices_refused():
    "Each bad choice raises a ValueError naming its value when the optimizer is built"
    w = torch.zeros(3, requires_grad=True)
    cases = [(dict(state_dtype='4bit'), "Invalid state_dtype: '4bit'"), (dict(state_dtype=torch.int8), 'Invalid state_dtype: torch.int8'),
             (dict(kahan_sum=True), 'Invalid kahan_sum: True'), (dict(stochastic_round=True), 'Invalid stochastic_round: True'),
             (dict(kahan_sum='yes'), "Invalid kahan_sum: 'yes'")]
    for modes,msg in cases:
        for name in ('Adam', 'Lion', 'BAdam'):
            with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace('[', r'\[')):
                getattr(fastopt, name)([w], lr=1e-3, **modes)
    with pytest.raises(ValueError, match='Invalid stochastic_round: True for torch.int64'):
        fastopt.Adam([torch.zeros(3, dtype=torch.int64)], lr=1e-3, stochastic_round=True)
    with pytest.raises(ValueError, match='use kahan_sum for float16'):
        fastopt.Adam([torch.zeros(3, dtype=torch.float16, requires_grad=True)], lr=1e-3, stochastic_round=True)

def test_set_precision_converts_state():
    "`set_precision` on a stepped optimizer: its float32 state is quantized at the next step and the run goes on close to the float32 one"
    ps,opt = run('Adam', torch.float32, steps=3)
    ref,_ = run('Adam', torch.float32, steps=6)
    opt.set_precision(state_dtype='8bit')
    for g in grads(6)[3:]:
        for p,x in zip(ps, g): p.grad = x
        opt.step()
    assert is_quantized(opt.state[ps[0]]['grad_avg'])
    assert max((p - r).abs().max().item() for p,r in zip(ps, ref)) < 0.05 * 1e-2 * 6
    with pytest.raises(ValueError, match='Invalid kahan_sum: True'): opt.set_precision(kahan_sum=True)

def test_schedule_free_switch_keeps_compensation():
    "ScheduleFreeAdamW's train/eval switch moves a bf16 weight with its compensation, and back again to within the compensation's resolution"
    ps,opt = run('ScheduleFreeAdamW', torch.bfloat16, steps=3, state_dtype='8bit')
    before = [p.float() + opt.state[p]['weight_comp'].float() for p in ps]
    opt.eval(); opt.train()
    after = [p.float() + opt.state[p]['weight_comp'].float() for p in ps]
    for b,a in zip(before, after): assert (b - a).abs().max() <= 2**-14 * b.abs().max()

def test_kit_checks_every_mode():
    "The kit runs its checks in every low-precision mode, and names a stat whose state escapes the mode"
    from fastopt.testing import check_optimizer, OptimizerCheckFailed
    from fastopt.core import Optimizer
    report = check_optimizer(fastopt.Lion, modes='all', fused=False, learner=False)
    assert {r[0] for r in report.rows} >= {'bf16:resume_state_dict', '8bit:state_precision', 'bf16-8bit:copies', 'bf16-stochastic:zero_grads'}
    def flat_avg(p, mom, grad_avg=None, **kwargs):
        "A momentum kept flattened: a mistake, since low-precision state is stored in the parameter's shape"
        if grad_avg is None: grad_avg = torch.zeros(p.numel(), dtype=p.dtype)
        return {'grad_avg': grad_avg.mul_(mom).add_(p.grad.reshape(-1))}
    def flat_step(p, lr, grad_avg, **kwargs): p.data.sub_(grad_avg.view(p.shape) * lr)
    def FlatMomentum(params, lr, mom=0.9, fused=False): return Optimizer(params, [flat_avg, flat_step], lr=lr, mom=mom, fused=fused)
    with pytest.raises(OptimizerCheckFailed, match=r"8bit:state_precision.*has the parameter's 24 values in shape \(24,\), not \(3, 2, 2, 2\)"):
        check_optimizer(FlatMomentum, modes=['8bit'], fused=False, learner=False)

def test_group_added_later_steps_in_low_precision():
    "A parameter group added after the first step (fastopt.optim's add_param_group) steps with its own stochastic-rounding position"
    import fastopt.optim as fo
    w,v = make(torch.bfloat16)[:2]
    opt = fo.AdamW([w], lr=1e-2, stochastic_round=True)
    w.grad = torch.randn_like(w); opt.step()
    opt.add_param_group({'params': [v]})
    before = v.detach().clone()
    for p in (w, v): p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(v, before) and opt.state[v]['round_count'] == 1

def test_eager_quantizing_works_in_chunks():
    "Eager quantize/dequantize of a 4M-value tensor give what one quantize_rows/dequantize_rows call gives, with temporaries bounded by `qchunk` rows (a few MB) instead of several times the tensor (about 107 MB in one call)"
    from fastopt.precision import quantize, dequantize, qchunk
    from fastopt.lowbit import quantize_rows, dequantize_rows, rows, unrows, QBLOCK
    from fastopt.release import TensorMemory
    x = torch.randn(4096, 1000, generator=torch.Generator().manual_seed(0))   # 4,096,000 values: the last block padded
    with TensorMemory() as before: pass
    with TensorMemory() as m: q = quantize(x)
    with TensorMemory() as m2: y = dequantize(q)
    chunk = qchunk * QBLOCK * 4
    assert m.peak - before.peak <= x.numel() + 10 * chunk, f"quantize held {(m.peak - before.peak) / 1e6:.1f} MB more"
    assert m2.peak - m.now <= x.nbytes + 10 * chunk, f"dequantize held {(m2.peak - m.now) / 1e6:.1f} MB more"
    c,s = quantize_rows(rows(x))
    assert torch.equal(q['scale'], s.view(-1)) and torch.equal(rows(q['codes'].contiguous()), c)
    assert torch.equal(y, unrows(dequantize_rows(c, s), x))

def test_random_bits_int32_equal_the_int64_hash():
    "The int32 form of the random bits and of stochastic rounding gives the bits of the int64 form (products masked to 32 bits), across positions past 2^31 and for NaN, infinities and the largest payloads"
    from fastopt.lowbit import hash_bits, round_key, position_key, random_bits, stochastic_round_bf16
    key = round_key(position_key(7, 3), torch.tensor([[5.], [9.]], dtype=torch.float64))
    idx = torch.arange(2**16).view(2, -1) + 2**31 - 100
    want = hash_bits((key + idx * 0x2C1B3C6D) & 0xFFFFFFFF)   # the int64 form
    got = random_bits(key, idx)
    assert got.dtype == torch.int32 and torch.equal(got.to(torch.int64) & 0xFFFFFFFF, want)
    w = torch.randn(2, 2**15) * torch.logspace(-40, 38, 2**15)
    w[0, :4] = torch.tensor([float('nan'), float('inf'), -float('inf'), 0.])
    w[1, :2] = torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    i64 = w.view(torch.int32).to(torch.int64) + (want & 0xFFFF)   # the int64 rounding
    ref = (i64 & ~0xFFFF).to(torch.int32).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(stochastic_round_bf16(w, got).view(torch.int16), ref.view(torch.int16))

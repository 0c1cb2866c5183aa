"""Independent transcriptions of ../shared/ALGORITHMS.md, written from the contract's formulas with Python
scalars for everything that depends on the step count. They share no code with fastopt."""
import math
import torch
from helpers import make_params, make_grads, NO_WD, N_STEPS

def _softplus(x, beta): return torch.log1p(torch.exp(beta * x)) / beta

def _update(algo, p, g, st, t, lr, mom, sqr_mom, eps, wd, do_wd, beta=0., rho_min=5., trust_clip=10., trust_wd=False):
    st['m'] = mom * st['m'] + (1 - mom) * g
    st['v'] = sqr_mom * st['v'] + (1 - sqr_mom) * g * g
    m_hat = st['m'] / (1 - mom**t)
    v_hat = st['v'] / (1 - sqr_mom**t)
    if algo == 'adam':
        return p - lr * m_hat / (v_hat.sqrt() + eps)
    if algo == 'amsgrad':
        st['vmax'] = torch.maximum(st['vmax'], st['v'])
        return p - lr * m_hat / ((st['vmax'] / (1 - sqr_mom**t)).sqrt() + eps)
    if algo == 'radam':
        rho_inf = 2 / (1 - sqr_mom) - 1
        rho_t = rho_inf - 2 * t * sqr_mom**t / (1 - sqr_mom**t)
        if rho_t > rho_min:
            r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            denom = v_hat.sqrt() + eps
            if beta > 0: denom = _softplus(denom, beta)
            return p - lr * r_t * m_hat / denom
        return p - lr * m_hat
    if algo == 'lamb':
        u = m_hat / (v_hat.sqrt() + eps)
        if trust_wd and do_wd: u = u + wd * p
        pn, un = p.norm().item(), u.norm().item()
        q = pn / un if pn > 0 and un > 0 else 1.
        if trust_clip is not None: q = min(q, trust_clip)
        return p - lr * q * u
    raise ValueError(algo)

# ---- The ten seed-derived algorithms. Each `_step_*` below does one whole step of one parameter (its own
# state, its own step count), including gradient centralization, s0 recording and weight decay, so a single
# step can be checked by hand on a one-element tensor.

def _softplus_stable(x, beta):
    "softplus_β(x) = log(1 + exp(β·x))/β without overflow for large β·x"
    return x.clamp_min(0) + torch.log1p(torch.exp(-beta * x.abs())) / beta

def _rms(x): return x.pow(2).mean().sqrt().item()

def _channel_rms(p):
    "RMS of p_k over every dim but dim 0, shaped to broadcast against p (a 0-d tensor is one channel)"
    if p.ndim == 0: return p.abs()
    return p.reshape(p.shape[0], -1).pow(2).mean(1).sqrt().reshape(-1, *[1] * (p.ndim - 1))

def _centralize(g, conv_only):
    "Gradient centralization: subtract the mean over every dim except dim 0 (ndim == 4, or ndim >= 2)"
    if g.ndim == 4 or (not conv_only and g.ndim >= 2):
        return g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True)
    return g

def _layer_scale(p):
    "c = mean(|p|) over the whole tensor, 1 where it is 0"
    c = p.abs().mean().item()
    return c if c != 0 else 1.

def _sign_clamp(x, a):
    "x where |x| > a; sign(x)·a elsewhere; a where x == 0"
    return torch.where(x.abs() > a, x, torch.where(x == 0, torch.full_like(x, a), torch.sign(x) * a))

def _ratio_dev(num, m_prev, clip):
    "min(|ratio - 1|, clip) with ratio = num/m_prev where m_prev != 0, else 1"
    nz = m_prev != 0
    ratio = torch.where(nz, num / torch.where(nz, m_prev, torch.ones_like(m_prev)), torch.ones_like(num))
    return (ratio - 1).abs().clamp_max(clip)

NEW_ALGOS = ('sadam', 'sradam', 'adamgc', 'stableadam', 'adamawd', 'um', 'prelamb', 'duvadam', 'suadam', 'badam')

def _new_state(algo, p, scale_invariant=lambda p: p.ndim == 4, **_):
    "Per-parameter state; membership in Θ is decided on the parameter's initial value"
    st = dict(m=torch.zeros_like(p), v=torch.zeros_like(p), t=0)
    if algo in ('stableadam', 'adamawd'): st.update(theta=bool(scale_invariant(p)), s0=None)
    if algo == 'badam': st.update(g_prev=torch.zeros_like(p), u_prev=torch.zeros_like(p))
    return st

def _new_step(algo, p, g, st, lr, mom, sqr_mom, eps, wd, do_wd, decouple_wd=True,
              beta=50., rho_min=4., gc_conv_only=True, scale_invariant=None, ratio_clip=1e3):
    """One step of one of NEW_ALGOS for parameter `p` with gradient `g` (not None); returns the new `p`. `scale_invariant`
    is only read by `_new_state` (Θ is fixed on the initial value)."""
    st['t'] += 1
    t = st['t']
    b1c, b2c = 1 - mom**t, 1 - sqr_mom**t                     # Python floats
    # 1. gradient centralization comes first
    if algo == 'adamgc': g = _centralize(g, gc_conv_only)
    # 2. s0 on the first step, before anything changes p
    if algo in ('stableadam', 'adamawd') and st['theta'] and st['s0'] is None: st['s0'] = _channel_rms(p)
    # 3. fastai weight decay (AdamAWD has none)
    if do_wd and algo != 'adamawd':
        if decouple_wd: p = p * (1 - lr * wd)
        else: g = g + wd * p

    if algo in ('sadam', 'sradam', 'adamgc', 'stableadam', 'adamawd'):
        st['m'] = mom * st['m'] + (1 - mom) * g
        st['v'] = sqr_mom * st['v'] + (1 - sqr_mom) * g * g
        m_hat, v_hat = st['m'] / b1c, st['v'] / b2c
        if algo == 'sadam':
            return p - lr * m_hat / _softplus_stable(v_hat.sqrt(), beta)
        if algo == 'sradam':
            rho_inf = 2 / (1 - sqr_mom) - 1
            rho_t = rho_inf - 2 * t * sqr_mom**t / b2c
            if rho_t > rho_min:
                r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                return p - lr * m_hat / _softplus_stable(v_hat.sqrt() / r_t, beta)
            return p - lr * m_hat
        step = m_hat / (v_hat.sqrt() + eps)
        if algo == 'adamgc': return p - lr * step
        if algo == 'stableadam':
            if not st['theta']: return p - lr * step
            s0 = st['s0']
            nz = s0 != 0
            r = torch.where(nz, _channel_rms(p) / torch.where(nz, s0, torch.ones_like(s0)), torch.ones_like(s0))
            return p - lr * r * step
        # adamawd
        p = p - lr * step
        if not st['theta']: return p
        rms = _channel_rms(p)
        nz = rms != 0
        return torch.where(nz, p * st['s0'] / torch.where(nz, rms, torch.ones_like(rms)), p)

    if algo == 'um':
        st['m'] = mom * st['m'] + (1 - mom) * g
        m_hat = st['m'] / b1c
        rms = _rms(m_hat)
        return p - lr * m_hat / rms if rms > 0 else p

    if algo == 'prelamb':
        rp, rg = _rms(p), _rms(g)
        g_hat = g * rp / rg if rp > 0 and rg > 0 else g
        st['m'] = mom * st['m'] + (1 - mom) * g_hat
        return p - lr * st['m'] / b1c

    if algo == 'duvadam':
        dev = _ratio_dev(g, st['m'], ratio_clip)                  # uses m_{t-1}
        st['m'] = mom * st['m'] + (1 - mom) * g
        st['v'] = sqr_mom * st['v'] + (1 - sqr_mom) * dev * dev
        return p - lr * (st['m'] / b1c) / (1 + (st['v'] / b2c).sqrt())

    if algo == 'suadam':
        s = torch.sign(g)
        dev = _ratio_dev(s, st['m'], ratio_clip)                  # uses m_{t-1}
        st['m'] = mom * st['m'] + (1 - mom) * s
        st['v'] = sqr_mom * st['v'] + (1 - sqr_mom) * dev
        c = _layer_scale(p)
        return p - lr * c * (st['m'] / b1c) / (1 + st['v'] / b2c)

    if algo == 'badam':
        st['m'] = mom * st['m'] + (1 - mom) * g
        m_hat = st['m'] / b1c
        c = _layer_scale(p)
        if t == 1: u = lr * c * m_hat
        else:
            a = st['u_prev'].abs().mean().item()
            phi = (g - st['g_prev']) / _sign_clamp(st['u_prev'], a) if a != 0 else torch.zeros_like(g)
            phi = torch.where(torch.isfinite(phi), phi, torch.zeros_like(phi))   # the guard: Φ = 0 where it overflows
            st['v'] = sqr_mom * st['v'] + (1 - sqr_mom) * phi
            v_hat = st['v'] / (1 - sqr_mom**(t - 1))
            u = lr * c * m_hat / _softplus_stable(v_hat.abs(), beta)
        st['g_prev'], st['u_prev'] = g, u
        return p - u

    raise ValueError(algo)

def reference(algo, lr, mom, sqr_mom, eps, wd, decouple_wd=True, n=N_STEPS, **extra):
    """Run `algo` on the shared parameters and gradients: 'adam', 'amsgrad', 'radam', 'lamb', or one of NEW_ALGOS
    ('sadam', 'sradam', 'adamgc', 'stableadam', 'adamawd', 'um', 'prelamb', 'duvadam', 'suadam', 'badam')"""
    params = make_params()
    if algo in NEW_ALGOS:
        state = {k: _new_state(algo, p, **extra) for k,p in params.items()}
        for gs in make_grads(n):
            for k,p in params.items():
                if gs[k] is None: continue
                params[k] = _new_step(algo, p, gs[k], state[k], lr, mom, sqr_mom, eps, wd, k not in NO_WD,
                                      decouple_wd, **extra)
        return params
    state = {k: dict(m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p), t=0) for k,p in params.items()}
    decay_inside = extra.get('trust_wd', False)
    for gs in make_grads(n):
        for k,p in params.items():
            g = gs[k]
            if g is None: continue
            do_wd = k not in NO_WD
            if do_wd and not decay_inside:
                if decouple_wd: p = p * (1 - lr * wd)
                else: g = g + wd * p
            st = state[k]
            st['t'] += 1
            params[k] = _update(algo, p, g, st, st['t'], lr, mom, sqr_mom, eps, wd, do_wd, **extra)
    return params

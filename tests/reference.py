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

def reference(algo, lr, mom, sqr_mom, eps, wd, decouple_wd=True, n=N_STEPS, **extra):
    "Run `algo` ('adam', 'amsgrad', 'radam', 'lamb') on the shared parameters and gradients"
    params = make_params()
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

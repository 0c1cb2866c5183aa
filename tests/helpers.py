"Shared fixtures for the parity tests: a float64 parameter set that exercises the awkward cases."
import torch

N_STEPS = 60
SKIP_EVERY = 3  # parameter 'sometimes' has no gradient on every third step

def make_params():
    "Fresh float64 parameters: a matrix, an all-zero vector, a bias (do_wd=False), one that sometimes has no grad, a conv weight"
    g = torch.Generator().manual_seed(0)
    return dict(
        matrix    = torch.randn(4, 3, generator=g, dtype=torch.float64),
        zero      = torch.zeros(5, dtype=torch.float64),
        bias      = torch.randn(3, generator=g, dtype=torch.float64),
        sometimes = torch.randn(2, 2, generator=g, dtype=torch.float64),
        conv      = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64),
    )

NO_WD = {'bias'}

def make_grads(n=N_STEPS):
    "The gradient of each parameter at each step (None where it has none)"
    g = torch.Generator().manual_seed(1)
    shapes = {k: v.shape for k,v in make_params().items()}
    res = []
    for t in range(1, n+1):
        gs = {k: torch.randn(s, generator=g, dtype=torch.float64) for k,s in shapes.items()}
        if t % SKIP_EVERY == 0: gs['sometimes'] = None
        res.append(gs)
    return res

def run_fastai_style(opt_func, n=N_STEPS, **hypers):
    "Step a fastai-style optimizer (fastopt's or fastai's) through the gradient sequence; return the parameters"
    params = {k: v.clone().requires_grad_() for k,v in make_params().items()}
    opt = opt_func(list(params.values()), **hypers)
    for k in NO_WD: opt.state[params[k]]['do_wd'] = False
    for gs in make_grads(n):
        for k,p in params.items(): p.grad = None if gs[k] is None else gs[k].clone()
        opt.step()
    return {k: p.detach() for k,p in params.items()}

def run_torch(opt_cls, wd, n=N_STEPS, **kwargs):
    "Step a torch.optim optimizer; parameters in NO_WD get weight_decay=0"
    params = {k: v.clone().requires_grad_() for k,v in make_params().items()}
    groups = [dict(params=[p for k,p in params.items() if k not in NO_WD], weight_decay=wd),
              dict(params=[p for k,p in params.items() if k in NO_WD], weight_decay=0.)]
    opt = opt_cls(groups, **kwargs)
    for gs in make_grads(n):
        for k,p in params.items(): p.grad = None if gs[k] is None else gs[k].clone()
        opt.step()
    return {k: p.detach() for k,p in params.items()}

def max_rel_err(a, b):
    "Largest elementwise |a-b| / max(|b|, 1e-300) over all parameters"
    return max(((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-300)).max().item() for k in a)

def assert_params_close(a, b, rtol=1e-12, atol=1e-12):
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"parameter {k!r}: {m}")

# Digits settings for fastai's four namesakes in fastopt (the fourteen algorithms' are `fastopt.digits.digits_hypers`)
NAMESAKE_HYPERS = dict(SGD=dict(lr=0.1, mom=0.9), RMSProp=dict(lr=1e-3), QHAdam=dict(lr=1e-2), Larc=dict(lr=1.))

# The optimizers of `fastopt compare` that the tests below were written for: the fourteen seed algorithms. The four
# modern ones (registered after them) are tested by test_modern.py, test_learner.py and the kit (test_testing.py).
from fastopt.registry import optimizers as _registry
MODERN = ('Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon')
SEED_OPTIMIZERS = {n: f for n,f in _registry.items() if n not in MODERN}

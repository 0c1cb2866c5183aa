"""Every stat and stepper traces into one torch.compile graph with hypers as 0-d tensors: no graph break, and no
recompile while lr, mom and the step counts change from step to step (the fused path relies on this)."""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters
from fastai.optimizer import _update
import fastopt
from fastopt.core import static_hypers

def group_step(cbs, params, states, hyper):
    "The eager strategy of Optimizer.step_group, over explicit states"
    res = []
    for p,state in zip(params, states):
        for cb in cbs: state = _update(state, cb(p, **{**state, **hyper}))
        res.append(state)
    return res

def as_tensors(hyper):
    "Hypers as float64 0-d tensors (in float32, 1 - sqr_mom for sqr_mom = 0.999 would lose 4 digits), static ones as they are"
    return {k: v if k in static_hypers or not isinstance(v, float) else torch.tensor(v, dtype=torch.float64) for k,v in hyper.items()}

WITH_WD = ('Adam', 'AMSGrad', 'RAdam', 'Lamb', 'SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'UM', 'PreLamb', 'DuvAdam', 'SUAdam', 'BAdam')
CASES = [(name, dict(wd=0.1, decouple_wd=d)) for name in WITH_WD for d in (True, False)]
CASES += [('RAdam', dict(beta=5., wd=0.1)), ('Lamb', dict(trust_wd=True, wd=0.1)), ('AdamAWD', {}), ('AdamGC', dict(gc_conv_only=False))]

@pytest.mark.parametrize('name,kw', CASES, ids=[f'{n}{kw}' for n,kw in CASES])
def test_one_graph_no_recompiles(name, kw):
    dynamo.reset(); counters.clear()
    g = torch.Generator().manual_seed(0)
    def make():
        gen = torch.Generator().manual_seed(1)
        ps = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.zeros(3, requires_grad=True),
              torch.randn(3, 2, 2, 2, generator=gen).requires_grad_()]
        opt = getattr(fastopt, name)(ps, lr=1e-2, **kw)
        opt.state[ps[1]]['do_wd'] = False
        return ps, opt
    (ps, opt), (ps_ref, opt_ref) = make(), make()
    compiled = torch.compile(group_step, backend='eager', fullgraph=True)
    for i in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for o,params in ((opt, ps), (opt_ref, ps_ref)):
            o.set_hypers(lr=1e-2 * (1 + i), mom=0.9 - 0.01 * i)
            for p,gr in zip(params, grads): p.grad = gr.clone()
        opt_ref.step()
        if i == 0: opt.step()   # the first step creates the state: a structural change, run eagerly
        else:
            states = compiled(opt.cbs, ps, [opt.state[p] for p in ps], as_tensors(opt.hypers[0]))
            for p,s in zip(ps, states): opt.state[p] = s
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])
    assert not counters['graph_break'], dict(counters['graph_break'])
    for p,q in zip(ps, ps_ref): torch.testing.assert_close(p, q)

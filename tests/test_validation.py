"Bad input fails at construction (or when a hyper is set) with a message naming the value."
import math
import pytest
import torch
import fastopt

def params(): return [torch.nn.Parameter(torch.randn(3))]

BUILDERS = [fastopt.Adam, fastopt.AMSGrad, fastopt.RAdam, fastopt.Lamb]
COMMON_BAD = [('lr', -1e-3), ('lr', math.nan), ('lr', math.inf), ('mom', 1.5), ('mom', 1.0), ('mom', -0.1),
              ('sqr_mom', 1.0), ('sqr_mom', math.nan), ('eps', -1e-8), ('wd', -0.01)]

@pytest.mark.parametrize('builder', BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize('name,value', COMMON_BAD)
def test_common_hypers(builder, name, value):
    kw = {'lr': 1e-3, name: value}
    with pytest.raises(ValueError, match=f"Invalid {name}: {value!r}"): builder(params(), **kw)

@pytest.mark.parametrize('builder,name,value', [
    (fastopt.RAdam, 'beta', -1.), (fastopt.RAdam, 'rho_min', 3.9), (fastopt.RAdam, 'rho_min', math.nan),
    (fastopt.Lamb, 'trust_clip', 0.), (fastopt.Lamb, 'trust_clip', -1.)])
def test_own_hypers(builder, name, value):
    with pytest.raises(ValueError, match=f"Invalid {name}: {value!r}"): builder(params(), lr=1e-3, **{name: value})

def test_valid_edges_are_accepted():
    fastopt.Adam(params(), lr=0., mom=0., sqr_mom=0., eps=0., wd=0.)
    fastopt.RAdam(params(), lr=1e-3, rho_min=4., beta=0.)
    fastopt.Lamb(params(), lr=1e-3, trust_clip=None)

def test_bool_is_not_a_number():
    with pytest.raises(ValueError, match="Invalid wd: True"): fastopt.Adam(params(), lr=1e-3, wd=True)

def test_set_hyper_is_validated_and_leaves_old_value():
    opt = fastopt.Adam(params(), lr=1e-3)
    with pytest.raises(ValueError, match="Invalid mom: 1.5"): opt.set_hyper('mom', 1.5)
    assert opt.hypers[0]['mom'] == 0.9

def test_slice_lr_is_validated_per_group():
    groups = [[torch.nn.Parameter(torch.randn(2))], [torch.nn.Parameter(torch.randn(2))]]
    opt = fastopt.Adam(groups, lr=slice(1e-4, 1e-2))
    assert [h['lr'] for h in opt.hypers] == pytest.approx([1e-4, 1e-2])
    with pytest.raises(ValueError, match="Invalid lr: -0.01"): opt.set_hyper('lr', slice(-0.01))

def test_lamb_trust_wd_with_l2_is_rejected():
    with pytest.raises(ValueError, match="Invalid decouple_wd: False with trust_wd=True"):
        fastopt.Lamb(params(), lr=1e-3, trust_wd=True, decouple_wd=False)

@pytest.mark.parametrize('bad,err,msg', [
    ([], ValueError, 'empty parameter list'),
    ([[], []], ValueError, 'empty parameter list'),
    (iter([]), ValueError, 'empty parameter list'),
    ([1.0], TypeError, 'can only optimize Tensors'),
    ([{'params': [torch.zeros(1)]}], TypeError, 'not torch-style dicts'),
    ([torch.zeros(2, dtype=torch.complex64)], ValueError, 'complex parameters'),
])
def test_bad_parameter_lists(bad, err, msg):
    with pytest.raises(err, match=msg): fastopt.Adam(bad, lr=1e-3)

def test_same_parameter_twice():
    p = torch.nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError, match='appears more than once'): fastopt.Adam([p, p], lr=1e-3)
    with pytest.raises(ValueError, match='appears more than once'): fastopt.Adam([[p], [p]], lr=1e-3)

def test_sparse_gradient():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fastopt.Adam(list(emb.parameters()), lr=1e-3)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match='sparse gradients'): opt.step()
    assert torch.equal(emb.weight, before)

def test_closure_is_refused():
    with pytest.raises(NotImplementedError, match='closure'): fastopt.Adam(params(), lr=1e-3).step(lambda: 0.)

def test_load_state_dict_checks_shape_first():
    a = fastopt.Adam(params() + params(), lr=1e-3)
    b = fastopt.Adam([params(), params()], lr=1e-3)
    with pytest.raises(ValueError, match='2 parameter groups, this optimizer has 1'): a.load_state_dict(b.state_dict())
    c = fastopt.Adam(params(), lr=1e-3)
    with pytest.raises(ValueError, match='state for 1 parameters, this optimizer has 2'): a.load_state_dict(c.state_dict())

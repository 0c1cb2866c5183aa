"Bad input fails at construction (or when a hyper is set) with a message naming the value."
import inspect, math, re
import pytest
import torch
import fastopt

def params(): return [torch.nn.Parameter(torch.randn(3))]

NAMES = ['Adam', 'AMSGrad', 'RAdam', 'Lamb', 'SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'AdamAWD', 'UM', 'PreLamb',
         'DuvAdam', 'SUAdam', 'BAdam', 'SGD', 'RMSProp', 'QHAdam', 'Larc']
BAD = dict(lr=[-1e-3, math.nan, math.inf, '0.1'], mom=[1.5, 1.0, -0.1, math.nan], sqr_mom=[1.0, -0.5, math.nan],
           eps=[-1e-8, math.nan], wd=[-0.01, math.inf], beta=[-1., math.nan], rho_min=[3.9, math.nan],
           trust_clip=[0., -1.], gc_conv_only=[1, 'yes', None], ratio_clip=[0., -5., math.nan],
           nu_1=[-0.1, 1.5], nu_2=[2., math.nan], trust_coeff=[0., -0.02])
CASES = [(n, k, v) for n in NAMES for k,vs in BAD.items() if k in inspect.signature(getattr(fastopt, n)).parameters for v in vs]

@pytest.mark.parametrize('name,hyper,value', CASES, ids=[f'{n}-{k}-{v!r}' for n,k,v in CASES])
def test_bad_hyper(name, hyper, value):
    "Every builder rejects every bad value of every hyper it takes, naming both"
    with pytest.raises(ValueError, match=re.escape(f"Invalid {hyper}: {value!r}")):
        getattr(fastopt, name)(params(), **{'lr': 1e-3, hyper: value})

def test_every_builder_is_covered():
    assert len({n for n,_,_ in CASES}) == len(NAMES) and len(CASES) > 100

@pytest.mark.parametrize('name', ['SAdam', 'SRAdam', 'BAdam'])
def test_softplus_optimizers_need_positive_beta(name):
    "RAdam's beta may be 0 (no softplus); these have no eps, so the softplus cannot be turned off"
    with pytest.raises(ValueError, match="Invalid beta: 0.0"): getattr(fastopt, name)(params(), lr=1e-3, beta=0.)
    fastopt.RAdam(params(), lr=1e-3, beta=0.)

def test_valid_edges_are_accepted():
    fastopt.Adam(params(), lr=0., mom=0., sqr_mom=0., eps=0., wd=0.)
    fastopt.RAdam(params(), lr=1e-3, rho_min=4., beta=0.)
    fastopt.Lamb(params(), lr=1e-3, trust_clip=None)
    fastopt.AdamGC(params(), lr=1e-3, gc_conv_only=False)

def test_hyper_no_callback_reads_is_refused():
    "UM has no second moment: a sqr_mom would be silently ignored, so it is an error"
    with pytest.raises(ValueError, match="Invalid hyper: 'sqr_mom'"): fastopt.UM(params(), lr=1e-3).set_hyper('sqr_mom', 0.99)

@pytest.mark.parametrize('name', NAMES + ['Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon'])
def test_every_optimizer_takes_wd(name):
    "Learner(wd=...) calls set_hypers(wd=...): every optimizer has a wd (AdamAWD's decays the weights it does not rescale)"
    opt = getattr(fastopt, name)(params(), lr=1e-3)
    opt.set_hypers(wd=0.01)
    assert all(h['wd'] == 0.01 for h in opt.hypers)

def test_non_leaf_tensor_is_refused():
    "As torch.optim: a tensor computed from a parameter cannot be stepped in place"
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"): fastopt.Adam([params()[0] * 2], lr=1e-3)

BOOL_OPTIONS = [(n, k) for n in NAMES + ['Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon']
                for k,q in inspect.signature(getattr(fastopt, n)).parameters.items() if q.annotation in (bool, 'bool', 'bool | str')]

@pytest.mark.parametrize('name,option', BOOL_OPTIONS, ids=[f'{n}-{k}' for n,k in BOOL_OPTIONS])
@pytest.mark.parametrize('value', ['yes', 'no', 1, None])
def test_bool_options_refuse_non_bools(name, option, value):
    "fused='yes' or decouple_wd='no' would be taken as True; every switch refuses anything but True and False, naming the value"
    with pytest.raises(ValueError, match=re.escape(f"Invalid {option}: {value!r}")): getattr(fastopt, name)(params(), lr=1e-3, **{option: value})

def test_bool_options_are_all_covered():
    assert {k for _,k in BOOL_OPTIONS} >= {'fused', 'decouple_wd', 'trust_wd', 'clip', 'gc_conv_only', 'nesterov'}

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

def test_learner_wd_with_adamawd(tmp_path):
    "`Learner(..., wd=0.01, opt_func=fastopt.AdamAWD)` trains: the Learner's wd reaches the optimizer's hypers"
    from fastopt.testing import kit_learner
    learn = kit_learner(fastopt.AdamAWD, tmp_path)
    learn.wd = 0.01
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(h['wd'] == 0.01 for h in learn.opt.hypers)

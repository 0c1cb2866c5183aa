"""Property tests (hypothesis) over all eighteen builders: the fourteen of `fastopt.cli.optimizers` plus fastopt's SGD,
RMSProp, QHAdam and Larc.

1. Hyperparameter validation. The range of each hyper a builder has is parsed from its rule's own text
   (`opt.hyper_rules`), which must read as the explicit table RULE_TEXTS says ('0 <= mom < 1', '0 < beta < inf' for
   SAdam/SRAdam/BAdam, 'trust_clip > 0' with no upper bound so inf is in it, 'True or False' for gc_conv_only...).
   - Invalid values raise ValueError("Invalid <hyper>: ...") at construction and from `set_hyper`, and a refused
     `set_hyper` leaves every group's hypers as they were: numbers below, above or on an open edge of the range,
     NaN, ±inf, bools, numpy bools, strings (numeric ones too), bytes, None (except trust_clip=None at construction,
     which means no cap), complex numbers (also with a zero imaginary part), bool and complex tensors, numpy scalars
     and 0-d or one-element tensors holding an invalid number, dicts and other objects; with two groups also a
     per-group list or tuple with an invalid entry; and a slice with an invalid end.
   - Valid Python values are accepted and stored, one per group: floats and ints in the range, its closed edges and
     the floats next to its open ones, True/False for gc_conv_only, a per-group list or tuple.
   - Tests of their own: numbers of the other real types that the rules' `real` accepts (numpy scalars, 0-d and
     one-element tensors, Fractions) are stored; a slice with valid ends spreads valid values over 1-3 groups; a
     container with the wrong number of values (multi-element tensors, arrays, lists, tuples, empty ones, a slice
     without a stop) and an int too large for a float are refused with ValueError.
2. Fused equals eager: random builder, valid hypers (lr, mom, sqr_mom, eps, wd, decouple_wd and each builder's own
   knobs; β2 and QHAdam's ν2 >= 0.5 in properties 2-5, see run_hypers for why), 1-2 groups of 1-3 parameters with shapes from a pool (0-d, sizes with 1s, 4-D; numel <= 64), some of them
   all zero or with do_wd=False, float32 or float64, 5 steps of random gradients with about 20% exact zeros.
   Tolerance float32 rtol 1e-5, atol 1e-6 (as tests/test_fused.py); float64 rtol 1e-10, atol 1e-12.
3. Adam, AMSGrad and RAdam equal torch.optim (Adam/AdamW with amsgrad; RAdam with decoupled_weight_decay) in both
   weight-decay modes, eagerly, over 1-12 steps, random shapes, 1-2 groups with their own lr, do_wd=False as a torch
   group with weight_decay=0. torch's RAdam adds eps to √v_t, fastopt's to √v̂_t = √(v_t/(1-β2^t)), so torch gets
   eps·√(1-β2^t) at step t: the same denominator exactly, for any eps. Tolerance float64 rtol 1e-10, atol 1e-12
   (both sides compute the same formulas in a different order: a few ulps per step); float32 rtol 1e-5, atol 1e-6
   (the same few ulps at float32's 1.2e-7; torch's lerp for the first moment rounds its weight 1-β1 to float32).
4. Two identical runs are bit-identical (torch.equal on parameters and every state tensor), eager and fused; the
   second fused run traces and compiles a step of its own, and is checked inside property 2's test, after its first run.
5. From fresh state, 7 steps of all-zero gradients with wd=0 leave every parameter bit-identical (torch.equal), for
   every builder, eager here and fused in tests/test_fused.py (one fixed case per builder, on that test's compiled
   graph): each update is zero at zero gradient (eps > 0 is drawn: with eps=0 Adam-style steps divide 0 by 0, and
   Larc's local rate divides by eps).

Fused tests skip Hypothesis's shrink phase (each shrink step would compile again). Examples marked
`.via('discovered failure')` are bugs these properties found, pinned so that they fail deterministically until fixed and
stay as regression cases afterwards.
"""
import inspect, math, re
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st
import fastopt
from helpers import SEED_OPTIMIZERS as optimizers

pytestmark = pytest.mark.filterwarnings('ignore:overflow encountered:RuntimeWarning')  # np.float32(1e300) is inf

BUILDERS = {**optimizers, **{n: getattr(fastopt, n) for n in ('SGD', 'RMSProp', 'QHAdam', 'Larc')}}
NAMES = list(BUILDERS)
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]   # each shrink step of a fused test would compile again

# ---------------------------------------------------------------- 1. hyperparameter validation

RULE_TEXTS = dict(lr='0 <= lr < inf', mom='0 <= mom < 1', sqr_mom='0 <= sqr_mom < 1', eps='0 <= eps < inf',
                  wd='0 <= wd < inf', beta='0 <= beta < inf', rho_min='4 <= rho_min < inf', trust_clip='trust_clip > 0',
                  ratio_clip='ratio_clip > 0', nu_1='0 <= nu_1 <= 1', nu_2='0 <= nu_2 <= 1', trust_coeff='0 < trust_coeff < inf',
                  gc_conv_only='True or False')
POSITIVE_BETA = {'SAdam', 'SRAdam', 'BAdam'}   # no eps: the softplus cannot be turned off

def expected_rule_text(name, k): return '0 < beta < inf' if k == 'beta' and name in POSITIVE_BETA else RULE_TEXTS[k]

class Range(NamedTuple):
    "lo <= x (or lo < x) and x < hi (or x <= hi)"
    lo: float
    lo_closed: bool
    hi: float
    hi_closed: bool
    def __contains__(self, x):
        return (self.lo <= x if self.lo_closed else self.lo < x) and (x <= self.hi if self.hi_closed else x < self.hi)

BOOL = 'True or False'
_NUM = r'(-?inf|-?\d+(?:\.\d*)?(?:e-?\d+)?)'

def parse_rule(text):
    "The values a rule's text allows: 'a <= k < b' (either < or <=), 'k > a' (no upper bound, so inf too), or BOOL"
    if text.startswith(BOOL): return BOOL
    if m := re.match(rf'{_NUM} (<=?) \w+ (<=?) {_NUM}\b', text): return Range(float(m[1]), m[2] == '<=', float(m[4]), m[3] == '<=')
    if m := re.match(rf'\w+ > {_NUM}\b', text): return Range(float(m[1]), False, math.inf, True)
    raise ValueError(f'cannot parse rule text {text!r}')

def one_param(): return torch.nn.Parameter(torch.randn(3))
def build(name, n_groups, **hypers):
    "Builder `name` over `n_groups` groups of one parameter, lr=1e-3 unless given"
    params = [one_param()] if n_groups == 1 else [[one_param()] for _ in range(n_groups)]
    return BUILDERS[name](params, **{'lr': 1e-3, **hypers})
def snapshot(opt): return [dict(h) for h in opt.hypers]

_PROBES = {n: build(n, 1) for n in NAMES}
HYPERS = {n: sorted(o.hypers[0]) for n,o in _PROBES.items()}
RULES = {(n, k): o.hyper_rules[k][1] for n,o in _PROBES.items() for k in HYPERS[n]}
RANGES = {nk: parse_rule(text) for nk,text in RULES.items()}
NUMERIC = {n: [k for k in ks if RANGES[n, k] != BOOL] for n,ks in HYPERS.items()}

def allowed(x, r) -> bool:
    "Whether the rule must accept `x`: a bool for BOOL; otherwise a real number, not a bool, whose float value is in `r`"
    if r == BOOL: return isinstance(x, bool)
    if isinstance(x, (bool, np.bool_)): return False
    try: return float(x) in r
    except OverflowError: return False   # an int too large for a float cannot be the float a stepper needs

def test_rule_texts_are_the_expected_ranges():
    "Every hyper of every builder has a rule, reading as RULE_TEXTS says, that parse_rule understands; builders take them all"
    assert len(NAMES) == 18
    for name,o in _PROBES.items():
        assert set(HYPERS[name]) <= set(inspect.signature(BUILDERS[name]).parameters), name
        for k in HYPERS[name]:
            assert RULES[name, k].startswith(expected_rule_text(name, k)), (name, k, RULES[name, k])
    assert RANGES['Adam', 'mom'] == Range(0., True, 1., False) and RANGES['QHAdam', 'nu_1'] == Range(0., True, 1., True)
    assert RANGES['SAdam', 'beta'] == Range(0., False, math.inf, False) and RANGES['RAdam', 'beta'] == Range(0., True, math.inf, False)
    assert RANGES['Lamb', 'trust_clip'] == Range(0., False, math.inf, True) and RANGES['AdamGC', 'gc_conv_only'] == BOOL

def valid_numbers(r):
    "Python floats and ints in `r`, its closed edges and the floats next to its open edges"
    edges = [x for x in (r.lo, math.nextafter(r.lo, math.inf), r.hi, math.nextafter(r.hi, -math.inf)) if x in r]
    lo_int = math.ceil(r.lo) if r.lo_closed else math.floor(r.lo) + 1
    hi_int = 10**300 if r.hi == math.inf else (math.floor(r.hi) if r.hi_closed else math.ceil(r.hi) - 1)
    return st.one_of(st.floats(r.lo, r.hi, exclude_min=not r.lo_closed, exclude_max=not r.hi_closed),
                     st.sampled_from(edges), st.integers(lo_int, hi_int)).filter(lambda x: x in r)

def invalid_numbers(r):
    "Python floats and ints outside `r`: below it, above it, on an open edge, NaN, ±inf (ints within ±2**64)"
    parts = [st.floats(max_value=r.lo), st.integers(-2**64, math.floor(r.lo)),
             st.sampled_from([r.lo, math.nextafter(r.lo, -math.inf), r.hi, math.nextafter(r.hi, math.inf), -0., math.nan, -math.nan, -math.inf, math.inf])]
    if r.hi < math.inf: parts += [st.floats(min_value=r.hi), st.integers(math.ceil(r.hi), 2**64)]
    return st.one_of(parts).filter(lambda x: x not in r)

def other_real_types(x, one_element=True):
    "`x` as a numpy scalar, a 0-d tensor, a Fraction or (if `one_element`) a one-element tensor: other types `fastopt.core.real` reads"
    conv = [np.float64, np.float32, lambda v: torch.tensor(float(v), dtype=torch.float64), lambda v: torch.tensor(float(v))]
    if one_element: conv.append(lambda v: torch.tensor([float(v)], dtype=torch.float64))
    if isinstance(x, int) and abs(x) < 2**63: conv += [np.int64, torch.tensor]
    if math.isfinite(x): conv.append(Fraction)
    return st.sampled_from(conv).map(lambda f: f(x))

NOT_REAL = st.one_of(
    st.none(), st.text(max_size=3), st.floats(allow_nan=False).map(repr), st.binary(max_size=2),
    st.complex_numbers(max_magnitude=10), st.floats(0, 1).map(complex), st.floats(0, 1).map(np.complex128),
    st.floats(0, 1).map(lambda x: torch.tensor(complex(x, 0.))), st.booleans().map(np.bool_), st.booleans().map(torch.tensor),
    st.sampled_from([{}, {'v': 0.5}, object(), Ellipsis, math.sqrt]))

def invalid_value(r, n=1):
    "One value the rule must refuse (one-element tensors only with one group: see test_valid_number_of_another_real_type_is_accepted)"
    if r == BOOL: return st.one_of(NOT_REAL, st.integers(), st.floats(), st.floats(0, 1).map(torch.tensor))
    return st.one_of(st.booleans(), NOT_REAL, invalid_numbers(r),
                     invalid_numbers(r).flatmap(lambda x: other_real_types(x, n == 1)).filter(lambda v: not allowed(v, r)))

def valid_value(r): return st.booleans() if r == BOOL else valid_numbers(r)

def invalid_setting(r, n):
    "What `set_hyper` or a builder must refuse with `n` groups: an invalid value, a per-group list with one, a slice with an invalid end"
    opts = [invalid_value(r, n)]
    if n > 1:
        entries = st.lists(st.one_of(valid_value(r), invalid_value(r)), min_size=n, max_size=n)
        opts.append(st.tuples(entries, invalid_value(r), st.integers(0, n - 1), st.sampled_from([list, tuple]))
                    .map(lambda t: t[3](t[0][:t[2]] + [t[1]] + t[0][t[2] + 1:])))
    if r != BOOL:
        end = st.one_of(st.none(), valid_numbers(r), invalid_numbers(r))
        opts += [st.builds(slice, end, invalid_numbers(r)), st.builds(slice, invalid_numbers(r), end)]
    return st.one_of(opts)

def valid_setting(r, n):
    "A valid Python value, or one per group in a list or tuple"
    per_group = st.lists(valid_value(r), min_size=n, max_size=n)
    return st.one_of(valid_value(r), per_group, per_group.map(tuple))

@st.composite
def hyper_cases(draw, setting, hypers=HYPERS, n_groups=(1, 2)):
    "(builder name, hyper, number of groups, value)"
    name = draw(st.sampled_from(NAMES))
    k = draw(st.sampled_from(hypers[name]))
    n = draw(st.sampled_from(n_groups))
    return name, k, n, draw(setting(RANGES[name, k], n))

@settings(deadline=None, max_examples=200, suppress_health_check=SLOW)
@given(hyper_cases(invalid_setting))
@example(('Adam', 'mom', 1, 1.5)).via('the documented case')
def test_invalid_value_is_refused_at_construction(case):
    "Every builder refuses every invalid value of every hyper it has, with a ValueError naming the hyper"
    name, k, n, v = case
    if k == 'trust_clip' and v is None: return   # Lamb(trust_clip=None) asks for no cap
    with pytest.raises(ValueError, match=f'^Invalid {k}: '): build(name, n, **{k: v})

@settings(deadline=None, max_examples=200, suppress_health_check=SLOW)
@given(hyper_cases(invalid_setting), st.booleans())
def test_invalid_value_is_refused_by_set_hyper(case, one_at_a_time):
    "set_hyper (or set_hypers) refuses every invalid value with a ValueError naming the hyper, leaving every group's hypers unchanged"
    name, k, n, v = case
    opt = build(name, n)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f'^Invalid {k}: '):
        if one_at_a_time: opt.set_hyper(k, v)
        else: opt.set_hypers(**{k: v})
    assert snapshot(opt) == before

def _set(name, k, n, v, at_construction):
    if at_construction: return build(name, n, **{k: v})
    opt = build(name, n)
    opt.set_hyper(k, v)
    return opt

@settings(deadline=None, max_examples=400, suppress_health_check=SLOW)
@given(hyper_cases(valid_setting), st.booleans())
def test_valid_value_is_accepted(case, at_construction):
    "Valid Python values are accepted at construction and by set_hyper, and stored: the rules do not refuse everything"
    name, k, n, v = case
    opt = _set(name, k, n, v, at_construction)
    assert [h[k] for h in opt.hypers] == (list(v) if isinstance(v, (list, tuple)) else [v] * n)

@settings(deadline=None, max_examples=200, suppress_health_check=SLOW)
@given(hyper_cases(lambda r, n: valid_numbers(r).flatmap(other_real_types).filter(lambda v: allowed(v, r)), hypers=NUMERIC),
       st.booleans())
@example(('Adam', 'lr', 1, np.float64(1e-3)), True).via('discovered failure')
def test_valid_number_of_another_real_type_is_accepted(case, at_construction):
    "numpy scalars, 0-d and one-element tensors and Fractions in range pass the rules (`real` reads them), so they are stored"
    name, k, n, v = case
    opt = _set(name, k, n, v, at_construction)
    assert all(float(h[k]) == float(v) for h in opt.hypers)

def moderate(r): return valid_numbers(r).filter(lambda x: x == 0 or 1e-30 <= abs(x) <= 1e30)

@settings(deadline=None, max_examples=200, suppress_health_check=SLOW)
@given(hyper_cases(lambda r, n: st.builds(slice, moderate(r).filter(bool), moderate(r)), hypers=NUMERIC, n_groups=(1, 2, 3)),
       st.booleans())
@example(('QHAdam', 'nu_2', 3, slice(0.2, 1.0)), False).via('discovered failure')
def test_slice_with_valid_ends_is_accepted(case, at_construction):
    "slice(a, b) with valid a != 0 and b (within 1e±30) spreads valid values over the groups, ending at b"
    name, k, n, v = case
    opt = _set(name, k, n, v, at_construction)
    vals = [float(h[k]) for h in opt.hypers]
    assert vals[0] == float(v.start if n > 1 else v.stop) and vals[-1] == pytest.approx(float(v.stop), rel=1e-12)
    assert all(allowed(x, RANGES[name, k]) for x in vals)

def assert_refused(name, k, n, v, at_construction):
    "`v` for hyper `k` raises ValueError at construction or from `set_hyper`, leaving the hypers as they were"
    opt = build(name, n)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f'^Invalid {k}: '):
        if at_construction: build(name, n, **{k: v})
        else: opt.set_hyper(k, v)
    assert snapshot(opt) == before

@st.composite
def wrong_counts(draw, r, n):
    "A container of m values with m not 1 (which fastai broadcasts) and not n, or a slice without a stop"
    m = draw(st.sampled_from([m for m in (0, 2, 3, 4) if m != n]))
    vals = draw(st.lists(valid_value(r), min_size=m, max_size=m))
    kinds = [list, tuple] + ([] if r == BOOL else [lambda v: torch.tensor([float(x) for x in v]),
                                                   lambda v: torch.tensor([float(x) for x in v], dtype=torch.float64), np.array])
    v = draw(st.sampled_from(kinds))(vals)
    if r == BOOL: return v
    return draw(st.one_of(st.just(v), st.builds(slice, st.none() | valid_numbers(r), st.none())))

@settings(deadline=None, max_examples=150, suppress_health_check=SLOW)
@given(hyper_cases(wrong_counts), st.booleans())
@example(('Adam', 'mom', 1, torch.tensor([0.5, 0.6])), False).via('discovered failure')
@example(('SGD', 'mom', 1, torch.tensor([0.5, 0.6])), True).via('discovered failure')
def test_wrong_number_of_values_is_refused(case, at_construction):
    "Multi-element tensors and arrays, lists of the wrong length and stop-less slices raise ValueError, changing nothing"
    assert_refused(*case, at_construction)

@settings(deadline=None, max_examples=60, suppress_health_check=SLOW)
@given(hyper_cases(lambda r, n: st.tuples(st.sampled_from([-1, 1]), st.integers(309, 1000)).map(lambda t: t[0] * 10**t[1]), hypers=NUMERIC),
       st.booleans())
@example(('Adam', 'lr', 1, -10**400), True).via('discovered failure')
def test_int_too_large_for_a_float_is_refused(case, at_construction):
    "An int beyond float range (negative: below every range; positive: no float to step with) raises ValueError"
    assert_refused(*case, at_construction)

# ---------------------------------------------------------------- runs: shared by properties 2-5

SHAPES = [(), (1,), (6,), (1, 1), (3, 1), (2, 5), (1, 4, 1), (2, 1, 3), (4, 4, 4), (1, 2, 1, 1), (2, 3, 1, 2), (3, 2, 2, 2)]
ANY_SHAPE = st.lists(st.integers(1, 5), max_size=4).map(tuple).filter(lambda s: math.prod(s) <= 64)

def log_uniform(lo, hi): return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.**e)

@st.composite
def run_hypers(draw, name, with_wd=True, torch_like=False, eps=(1e-8, 1e-3)):
    "Valid hypers for builder `name`: the common ones and its own knobs; wd=0 unless `with_wd`; torch-comparable ones if `torch_like`"
    sig = set(inspect.signature(BUILDERS[name]).parameters)
    h = {'lr': draw(log_uniform(1e-4, 0.1))}
    def maybe(k, s):
        if k in sig: h[k] = draw(s)
    maybe('mom', st.one_of(st.just(0.), st.floats(0., 0.99)))
    # Two correct implementations agree only up to rounding, and a step m/(√v̂ + eps) multiplies a rounding difference by
    # up to lr/eps where √v̂ <= eps. With β2 >= 0.5 (QHAdam: also ν2 >= 0.5) v̂ keeps half of its history, so that takes
    # every past gradient to be that small; with β2 near 0 one tiny gradient does (found against torch, float32, β2 = 0: a
    # zero gradient under L2 decay turned a 1-ulp difference in p into 1e-3; with β1 = 1.8e-6 it turned torch's
    # float32-rounded lerp weight 1-β1 into 3e-5). Validation (property 1) covers the whole range.
    maybe('sqr_mom', st.floats(0.5, 0.999))
    maybe('eps', log_uniform(*eps))
    maybe('wd', st.one_of(st.just(0.), log_uniform(1e-4, 0.1)) if with_wd else st.just(0.))
    maybe('decouple_wd', st.booleans())
    if not torch_like:   # torch's RAdam has no softplus and rectifies from rho_t > 5
        maybe('beta', st.one_of(st.just(0.), st.floats(1., 100.)) if name == 'RAdam' else st.floats(1., 100.))
        maybe('rho_min', st.floats(4., 6.))
    maybe('trust_clip', st.one_of(st.none(), st.floats(0.5, 20.)))
    maybe('ratio_clip', log_uniform(1., 1e4))
    maybe('nu_1', st.floats(0., 1.))
    maybe('nu_2', st.floats(0.5, 1.))
    maybe('trust_coeff', log_uniform(1e-3, 1.))
    maybe('clip', st.booleans())
    maybe('gc_conv_only', st.booleans())
    if 'trust_wd' in sig and h['decouple_wd']: maybe('trust_wd', st.booleans())
    return h

@dataclass
class Case:
    name: str
    hypers: dict
    groups: list     # per group, per parameter: (shape, do_wd, starts at zero)
    lrs: list        # per group
    dtype: torch.dtype
    seed: int
    pscale: float    # parameters ~ N(0, pscale²)
    gscale: float    # gradients ~ N(0, gscale²)

@st.composite
def cases(draw, names=NAMES, shapes=st.sampled_from(SHAPES), max_groups=2, **kw):
    "A builder, valid hypers and 1-`max_groups` groups of 1-3 parameters"
    name = draw(st.sampled_from(names))
    spec = st.tuples(shapes, st.booleans(), st.sampled_from([False, False, False, True]))
    groups = draw(st.lists(st.lists(spec, min_size=1, max_size=3), min_size=1, max_size=max_groups))
    hypers = draw(run_hypers(name, **kw))
    lrs = [hypers['lr']] + [draw(log_uniform(1e-4, 0.1)) for _ in groups[1:]]
    return Case(name, hypers, groups, lrs, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**32 - 1)),
                draw(log_uniform(0.1, 10.)), draw(log_uniform(1e-3, 10.)))

def init_params(case):
    g = torch.Generator().manual_seed(case.seed)
    return [[(torch.zeros(s, dtype=case.dtype) if zero else torch.randn(s, generator=g, dtype=case.dtype) * case.pscale).requires_grad_()
             for s,_,zero in pg] for pg in case.groups]

def grad_steps(case, steps, zero=False):
    "Fresh gradients for every parameter at each step: N(0, gscale²) with about 20% exact zeros, or all zero"
    g = torch.Generator().manual_seed(case.seed + 1)
    shapes = [s for pg in case.groups for s,_,_ in pg]
    for _ in range(steps):
        if zero: yield [torch.zeros(s, dtype=case.dtype) for s in shapes]
        else: yield [(torch.randn(s, generator=g, dtype=case.dtype) * case.gscale).masked_fill_(torch.rand(s, generator=g) < 0.2, 0.)
                     for s in shapes]

def run(case, fused, steps, zero_grads=False):
    "Step the case's builder; return its parameters (flat) and the optimizer"
    params = init_params(case)
    opt = BUILDERS[case.name](params, fused=fused, **case.hypers)
    if len(params) > 1: opt.set_hyper('lr', case.lrs)
    flat = []
    for pg,ps in zip(case.groups, params):
        for (_,do_wd,_),p in zip(pg, ps):
            if not do_wd: opt.state[p]['do_wd'] = False
            flat.append(p)
    for grads in grad_steps(case, steps, zero_grads):
        for p,g in zip(flat, grads): p.grad = g
        opt.step()
    return [p.detach() for p in flat], opt

def assert_all_close(a, b, dtype):
    for i,(x,y) in enumerate(zip(a, b)): torch.testing.assert_close(x, y, **TOL[dtype], msg=lambda m: f'parameter {i}: {m}')

# ---------------------------------------------------------------- 2. fused equals eager

@settings(deadline=None, max_examples=6, suppress_health_check=SLOW, phases=NO_SHRINK)
@given(cases())
@example(Case('Adam', dict(lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., decouple_wd=True), [[((), True, False), ((3,), True, False)]],
              [1e-2], torch.float64, 0, 1., 1.)).via('discovered failure')
def test_fused_equals_eager(case):
    "The compiled group step gives the eager step's parameters for random builders, hypers, shapes and dtypes; a second fused run, compiling a step of its own, gives the same bits (property 4)"
    fused, opt = run(case, True, 5)
    assert opt.fused, 'the fused path fell back to eager, which would make this comparison vacuous'
    # 0-d and empty parameters step eagerly even when fused, and so, for optimizers with per-channel reductions, do
    # tensors whose rows are not whole 64-element blocks
    per_channel = any(getattr(cb, 'per_channel', None) or getattr(getattr(cb, 'func', None), 'per_channel', None) for cb in opt.cbs)
    flat = [p for pg in opt.param_lists for p in pg if p.ndim > 0 and p.numel() > 0 and (not per_channel or fastopt.flat.channel_aligned(p))]
    assert opt._fns or not flat, 'nothing was compiled'
    check_identical_runs(case, True, (fused, opt))
    eager, _ = run(case, False, 5)
    assert_all_close(fused, eager, case.dtype)

# ---------------------------------------------------------------- 3. Adam, AMSGrad, RAdam equal torch.optim

def run_torch(case, steps):
    "The same run with torch.optim: one torch group per fastopt group and do_wd, RAdam's eps moved inside the bias correction"
    h, params = case.hypers, init_params(case)
    groups = [dict(params=sel, lr=lr, weight_decay=h['wd'] if on else 0.)
              for pg,ps,lr in zip(case.groups, params, case.lrs) for on in (True, False)
              if (sel := [p for (_,do_wd,_),p in zip(pg, ps) if do_wd == on])]
    kw = dict(betas=(h['mom'], h['sqr_mom']), eps=h['eps'], foreach=False)
    if case.name == 'RAdam': opt = torch.optim.RAdam(groups, decoupled_weight_decay=h['decouple_wd'], **kw)
    else: opt = (torch.optim.AdamW if h['decouple_wd'] else torch.optim.Adam)(groups, amsgrad=case.name == 'AMSGrad', **kw)
    flat = [p for ps in params for p in ps]
    for t,grads in enumerate(grad_steps(case, steps), 1):
        for p,g in zip(flat, grads): p.grad = g
        if case.name == 'RAdam':   # torch: √v_t + eps'; fastopt: √(v_t/(1-β2^t)) + eps; equal with eps' = eps·√(1-β2^t)
            for grp in opt.param_groups: grp['eps'] = h['eps'] * math.sqrt(1 - h['sqr_mom']**t)
        opt.step()
    return [p.detach() for p in flat]

@settings(deadline=None, max_examples=150, suppress_health_check=SLOW)
@given(cases(['Adam', 'AMSGrad', 'RAdam'], shapes=ANY_SHAPE, torch_like=True, eps=(1e-12, 1e-3)), st.integers(1, 12))
def test_adam_amsgrad_radam_equal_torch(case, steps):
    "fastopt's Adam, AMSGrad and RAdam match torch.optim's in both weight-decay modes"
    ours, _ = run(case, False, steps)
    assert_all_close(ours, run_torch(case, steps), case.dtype)

# ---------------------------------------------------------------- 4. determinism

def check_identical_runs(case, fused, first=None):
    "A second run of `case` gives bit-identical parameters and state to the first (`run`'s result, made here unless given)"
    a, opt_a = first or run(case, fused, 5)
    fastopt.fused._shared_steps.clear()   # so the second run traces and compiles a step of its own, as another process would
    b, opt_b = run(case, fused, 5)
    assert not fused or not {id(f) for f in opt_a._fns.values()} & {id(f) for f in opt_b._fns.values()}
    assert opt_a.fused == opt_b.fused == fused
    for x,y in zip(a, b): assert torch.equal(x, y)
    for sa,sb in zip(opt_a.state_dict()['state'], opt_b.state_dict()['state']):
        assert sa.keys() == sb.keys()
        for k in sa: assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k

@settings(deadline=None, max_examples=40, suppress_health_check=SLOW)
@given(cases(shapes=ANY_SHAPE))
def test_two_eager_runs_are_bit_identical(case):
    "Two eager runs of the same case give bit-identical parameters and state"
    check_identical_runs(case, False)

# Two fused runs are compared in test_fused_equals_eager (property 2), which has made the first of them already.

# ---------------------------------------------------------------- 5. zero gradients leave parameters unchanged
# Why every builder's update is exactly zero at zero gradient (with eps > 0 and wd = 0), so none is excluded:
# Adam, AMSGrad, AdamGC, StableAdam, RMSProp, QHAdam: m = v = 0 and the step is 0/(√0 + eps) = 0 (AdamGC centres a zero
#   gradient to zero; StableAdam's per-channel rate multiplies the zero step).
# RAdam, SRAdam: unrectified steps are lr·m̂ = 0; rectified ones divide m̂ = 0 by a positive denominator (eps or softplus).
# SAdam: 0 over softplus_β(0) = log 2/β > 0.  Lamb: the update is 0 and the trust ratio is 1 when its norm is 0.
# UM: RMS(m) = 0 is replaced by 1.  PreLamb: a zero gradient times the trust ratio (1 when ‖g‖ = 0) stays zero.
# DuvAdam: m_{t-1} = 0 gives ratio 1, deviation 0, so the step is m̂ = 0 over 1 + √0.
# SUAdam: sign(0) = 0, so m = 0 and the step 0·mean|p|/(1 + v̂) is zero.
# BAdam: m = 0; Φ = (0 - 0)/sign_clamp(0, 0) is NaN, replaced by 0, so the denominator is softplus_β(0) > 0 and u_t = 0.
# SGD: p - lr·0.  Larc/LARS: the local rate lr·τ·‖p‖/(0 + ‖p‖·0 + eps) is finite for eps > 0, times a zero gradient.
# AdamAWD: Adam's zero step, then each 4-D weight's channels are rescaled by init_rms/RMS(p), exactly 1 as p has not moved.

CONV = ((3, 2, 2, 2), True, False)   # a 4-D weight, which AdamGC, StableAdam and AdamAWD treat specially

def check_zero_grads(case, fused):
    case.groups[0].insert(0, CONV)
    ps, opt = run(case, fused, 7, zero_grads=True)
    assert opt.fused == fused
    for i,(p,p0) in enumerate(zip(ps, [p for pg in init_params(case) for p in pg])):
        assert torch.equal(p, p0), f'parameter {i} {tuple(p.shape)} moved by up to {(p - p0).abs().max().item():.3g}'

@pytest.mark.parametrize('name', NAMES)
@settings(deadline=None, max_examples=10, suppress_health_check=SLOW)
@given(st.data())
def test_zero_grads_leave_params_unchanged_eager(name, data):
    "With wd=0 and all-zero gradients no builder moves a parameter (eager, with a 4-D weight in every case)"
    check_zero_grads(data.draw(cases([name], shapes=ANY_SHAPE, with_wd=False)), False)

# The fused check is in tests/test_fused.py (`assert_zero_grads_move_nothing`), where it steps with the graph that
# test's fused run of the same builder has compiled.

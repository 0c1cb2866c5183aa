"""The conformance kit, `fastopt.testing`: every fastopt optimizer passes it, and it catches the four mistakes people make
when they write an optimizer: state kept outside the optimizer, a stepper that moves weights whose gradient is zero, a
Python branch on a tensor value, and a stat that forgets to return its state. Each mistake is a small optimizer that
works (it trains) but breaks one property; the kit must name that property."""
import math
import pytest
import torch
from fastai.optimizer import average_grad, momentum_step
import fastopt
from fastopt.core import Optimizer, check_bool
from fastopt.testing import OptimizerCheckFailed, check_optimizer, optimizer_checks
from fastopt.modern import ScheduleFreeCallback

SEED = ['Adam', 'AMSGrad', 'RAdam', 'Lamb', 'SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'AdamAWD', 'UM', 'PreLamb',
        'DuvAdam', 'SUAdam', 'BAdam', 'SGD', 'RMSProp', 'QHAdam', 'Larc']
MODERN = ['Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon']
OPTIONS = dict(BAdam=dict(beta=5.), SGD=dict(mom=0.9))
def options(name): return dict(OPTIONS.get(name, {}), **(dict(learner_cbs=[ScheduleFreeCallback()]) if name == 'ScheduleFreeAdamW' else {}))

# fastopt's own optimizers: every eager property for all 22 (the seed optimizers' fused path is tested in test_fused.py,
# test_properties.py and test_hostile.py), and the fused ones for the four new optimizers, one compile each.
EAGER = [c for n in SEED + MODERN for c in optimizer_checks(getattr(fastopt, n), fused=False, **options(n))]
FUSED = [c for n in MODERN for c in optimizer_checks(getattr(fastopt, n), **options(n)) if c.name in ('fused_equals_eager', 'no_recompiles')]

@pytest.mark.parametrize('check', EAGER, ids=str)
def test_fastopt_optimizers_pass_the_kit(check): check()

@pytest.mark.parametrize('check', FUSED, ids=str)
def test_modern_optimizers_fuse(check): check()

def test_report_lists_every_check():
    report = check_optimizer(fastopt.Adam, fused=False)
    assert len(report) == 11 and 'Adam: all 11 checks pass' in repr(report) and 'resume_learner' in repr(report)

# ---------------------------------------------------------------- the four mistakes

_outside = {}
def outside_avg(p, mom, **kwargs):
    "Mistake 1: the running average kept in a module-level dict keyed by the parameter, not in the optimizer's state"
    avg = _outside.setdefault(id(p), (p, torch.zeros_like(p)))[1]   # holding p keeps its id from being reused
    avg.mul_(mom).add_(p.grad, alpha=1 - mom)
    p.data.sub_(avg, alpha=kwargs['lr'])

def StateOutside(params, lr, mom=0.9, fused=False): return Optimizer(params, [outside_avg], lr=lr, mom=mom, fused=fused)

def drifting_step(p, lr, grad_avg, **kwargs):
    "Mistake 2: a small 'stabilizing' pull toward zero, which moves weights whose gradient is zero"
    p.data.sub_(grad_avg * lr + 1e-4 * lr * p.data)

def Drifting(params, lr, mom=0.9, fused=False): return Optimizer(params, [average_grad, drifting_step], lr=lr, mom=mom, fused=fused)

def branchy_step(p, lr, grad_avg, **kwargs):
    "Mistake 3: a Python `if` on a tensor value, which the fused graph cannot trace"
    if grad_avg.abs().max() > 10: grad_avg = grad_avg / 10
    p.data.sub_(grad_avg * lr)

def Branchy(params, lr, mom=0.9, fused=False): return Optimizer(params, [average_grad, branchy_step], lr=lr, mom=mom, fused=fused)

def forgetful_avg(p, mom, grad_avg=None, **kwargs):
    "Mistake 4: creates the average when it is missing and updates it, but does not return it"
    if grad_avg is None: grad_avg = torch.zeros_like(p)
    grad_avg.mul_(mom).add_(p.grad)

def forgetful_step(p, lr, grad_avg=None, **kwargs):
    if grad_avg is not None: p.data.sub_(grad_avg * lr)
    else: p.data.sub_(p.grad * lr)

def Forgetful(params, lr, mom=0.9, fused=False): return Optimizer(params, [forgetful_avg, forgetful_step], lr=lr, mom=mom, fused=fused)

def Forgetful2(params, lr, mom=0.9, fused=False): return Optimizer(params, [forgetful_avg, momentum_step], lr=lr, mom=mom, fused=fused)

def failure(opt_func, check, **kw):
    "The kit's error for the one check `check` of `opt_func`, after checking that the other checks it ran pass or fail as expected"
    (c,) = [c for c in optimizer_checks(opt_func, fused=check in ('fused_equals_eager', 'no_recompiles'), **kw) if c.name == check]
    with pytest.raises(OptimizerCheckFailed) as e: c()
    assert e.value.check == check
    return str(e.value)

def test_catches_state_kept_outside_the_optimizer():
    msg = failure(StateOutside, 'resume_state_dict')
    assert "StateOutside fails 'resume_state_dict'" in msg and 'differs after resuming at step 3' in msg and 'max |difference|' in msg
    assert 'copies' in failure(StateOutside, 'copies')

def test_catches_a_stepper_that_moves_weights_with_zero_gradient():
    msg = failure(Drifting, 'zero_grads')
    assert 'moved although every gradient was zero' in msg and 'parameter 0 (group 0, shape (3, 2, 2, 2), conv)' in msg

def test_catches_a_python_branch_on_a_tensor_value():
    msg = failure(Branchy, 'fused_equals_eager')
    assert 'fell back to eager' in msg and 'torch.where' in msg
    check_optimizer(Branchy, fused=False)   # eagerly it is a correct optimizer: only the fused path shows the mistake

def test_catches_a_stat_that_forgets_to_return_its_state():
    msg = failure(Forgetful, 'state_kept')
    assert "forgetful_avg creates 'grad_avg'" in msg and "return {'grad_avg': grad_avg}" in msg
    msg = failure(Forgetful2, 'state_kept')   # here the stepper needs the state, so the step itself fails
    assert "did not get the state it needs" in msg and 'grad_avg' in msg

def test_check_optimizer_names_every_failed_property():
    with pytest.raises(OptimizerCheckFailed) as e: check_optimizer(StateOutside, fused=False, learner=False)
    assert {'resume_state_dict', 'copies'} <= set(e.value.check.split(', '))

def test_catches_unvalidated_hypers_and_truthy_switches():
    def half_step(p, lr, shrink, **kwargs): p.data.sub_(p.grad * lr * shrink)
    def Unchecked(params, lr, shrink=0.5, nesterov:bool=False, fused=False):
        return Optimizer(params, [half_step], lr=lr, shrink=shrink, fused=fused)
    assert "set_hyper('shrink', nan) was accepted" in failure(Unchecked, 'hypers_validated')
    assert "nesterov='yes' was accepted" in failure(Unchecked, 'bool_options')

def test_reference_mismatch_shows_the_numbers():
    msg = failure(fastopt.Adam, 'reference', lr=1e-3, wd=0., reference=lambda ps: torch.optim.Adam(ps, lr=1e-3, eps=1e-8))
    assert 'differs from the reference after 20 steps' in msg and 'allowed: atol' in msg
    (c,) = [c for c in optimizer_checks(fastopt.Adam, lr=1e-3, wd=0., sqr_mom=0.999, eps=1e-8, fused=False,
                                        reference=lambda ps: torch.optim.Adam(ps, lr=1e-3)) if c.name == 'reference']
    assert 'match the reference' in c()

# ---------------------------------------------------------------- the mistakes of issue 26: each named once, with its cause

from fastopt.core import adam_stats, adam_denom, debiased_step, weight_decay_cb

def kept_grad_stat(p, prev_grad=None, grad_diff=None, **kwargs):
    "Adan's mistake: the previous gradient kept as p.grad itself, not a copy"
    if prev_grad is None: prev_grad = p.grad
    grad_diff = p.grad - prev_grad
    prev_grad = p.grad
    return {'prev_grad': prev_grad, 'grad_diff': grad_diff}

def diff_step(p, lr, grad_diff, **kwargs): p.data.sub_(lr * (p.grad + grad_diff))

def KeepsGrad(params, lr, fused=False): return Optimizer(params, [kept_grad_stat, diff_step], lr=lr, fused=fused)

def test_state_that_is_p_grad_itself_is_named():
    msg = failure(KeepsGrad, 'state_not_grad')
    assert "state 'prev_grad' of parameter 0" in msg and 'is p.grad itself (they share memory)' in msg and 'p.grad.clone()' in msg
    with pytest.raises(OptimizerCheckFailed) as e: check_optimizer(KeepsGrad, fused=False)
    assert e.value.check.split(', ')[0] == 'state_not_grad'   # the cause comes first, before the resumes it breaks

def test_the_kit_accumulates_gradients_in_place_as_a_learner_does():
    "With a fresh gradient tensor every step (the old kit) KeepsGrad passed resume_state_dict; with one zeroed in place it cannot"
    assert 'differs after resuming' in failure(KeepsGrad, 'resume_state_dict')

def test_reference_class_is_built_with_the_kits_lr():
    (c,) = [c for c in optimizer_checks(fastopt.Adam, fused=False, wd=0., sqr_mom=0.999, eps=1e-8, reference=torch.optim.Adam) if c.name == 'reference']
    assert 'match the reference' in c()   # torch.optim.Adam(params, lr=0.01, eps=1e-08), not its default lr=1e-3
    msg = failure(fastopt.Adam, 'reference', wd=0., reference=torch.optim.Adam)   # fastopt's sqr_mom 0.99 and eps 1e-5 are not torch's
    assert 'the reference was built as Adam(params, lr=0.01)' in msg and 'betas=(0.9, 0.999)' in msg

def Misspelled(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0., fused=False):
    return Optimizer(params, [weight_decay_cb(True), *adam_stats, adam_like_step], fused=fused, lr=lr, mom=mom, sqr_mon=sqr_mom, eps=eps, wd=wd)

def adam_like_step(p, lr, mom, sqr_mom, step, grad_avg, sqr_avg, eps, **kwargs):
    debiased_step(p, lr, mom, step, grad_avg, adam_denom(sqr_avg, sqr_mom, step, eps))

def test_a_misspelled_hyper_is_one_failure():
    with pytest.raises(OptimizerCheckFailed) as e: check_optimizer(Misspelled, fused=False)
    assert e.value.check == 'builds'
    msg = str(e.value)
    assert msg.count('sqr_mon') == 1 and "did you mean 'sqr_mom'?" in msg and 'were not run' in msg

def test_a_misspelled_option_is_one_failure():
    with pytest.raises(OptimizerCheckFailed) as e: check_optimizer(fastopt.Adam, fused=False, sqr_mon=0.99)
    assert e.value.check == 'builds' and "takes no option 'sqr_mon' (did you mean 'sqr_mom'?)" in str(e.value)

def stepper_asks_for_sqr_mom(p, lr, mom, sqr_mom, step, grad_avg, sqr_avg, eps, **kwargs):
    debiased_step(p, lr, mom, step, grad_avg, adam_denom(sqr_avg, sqr_mom, step, eps))

def NoSqrMom(params, lr, mom=0.9, eps=1e-5, fused=False):
    "The stepper reads sqr_mom, which the builder never passes: adam_stats reads it too, so the optimizer refuses to build"
    return Optimizer(params, [momentum_only, stepper_asks_for_sqr_mom], fused=fused, lr=lr, mom=mom, eps=eps)

def momentum_only(p, mom, grad_avg=None, sqr_avg=None, step=0, **kwargs):
    grad_avg = torch.zeros_like(p) if grad_avg is None else grad_avg
    sqr_avg = torch.zeros_like(p) if sqr_avg is None else sqr_avg
    return {'grad_avg': grad_avg.mul_(mom).add_(p.grad), 'sqr_avg': sqr_avg.addcmul_(p.grad, p.grad), 'step': step + 1}

def test_a_hyper_nobody_provides_is_named_with_what_there_is():
    with pytest.raises(OptimizerCheckFailed) as e: check_optimizer(NoSqrMom, fused=False)
    msg = str(e.value)
    assert e.value.check == 'builds' and "stepper_asks_for_sqr_mom needs 'sqr_mom'" in msg and 'neither a hyper (eps, lr, mom)' in msg

def plain_mean_step(p, lr, mom, sqr_mom, step, grad_avg, sqr_avg, eps, **kwargs):
    mask = (grad_avg * p.grad > 0).to(p.dtype)
    debiased_step(p, lr, mom, step, grad_avg * mask / mask.mean().clamp_min(1e-3), adam_denom(sqr_avg, sqr_mom, step, eps))

def PlainMean(params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, fused=False):
    return Optimizer(params, [*adam_stats, plain_mean_step], fused=fused, lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps)

def test_a_plain_mean_in_a_stepper_points_to_tensor_mean():
    msg = failure(PlainMean, 'fused_equals_eager')
    assert 'differs between fused and eager' in msg and 'plain_mean_step, line' in msg and 'mask.mean()' in msg and 'tensor_mean' in msg and 'layout=layout' in msg

"""torch.optim's own optimizer tests (test/test_optim.py and its OptimizerInfo matrix), property by property, for fastopt.

Where each applicable property is tested:
- errors on bad input (test_errors): test_validation.py, test_properties.py (hypothesis: invalid hypers always raise)
- step is a no-op for params without grad / for zero grads (test_step_is_noop_*): test_hostile.py, test_properties.py
- goes right direction, param groups lr/weight decay, lr schedulers: test_learner.py (digits accuracy, discriminative lr,
  wd_bn_bias, fit_one_cycle schedules lr and mom)
- foreach/fused match the for-loop: test_fused.py, test_properties.py (fused equals eager)
- state_dict round trip, deterministic, loads older dicts and non-tensor steps, weights_only, deepcopy: test_resume.py
- non-contiguous params, mixed dtypes in a group, non-empty state: test_hostile.py
- optimizer can be printed, tensor lr, deepcopy copies every public attribute, default dtype float64: below

Not applicable, and why:
- complex parameters (test_complex*) and sparse gradients (test_rosenbrock_sparse): refused with a clear error, as the
  issue asks (test_validation.py).
- step/state_dict hooks (register_step_pre_hook, ...): fastai optimizers have no hook API; fastai's Learner callbacks
  (before_step, after_step) are the extension point. The torch.optim classes of `fastopt.optim` have torch's hooks, and
  `maximize` and `step(closure)` (test_torch_optim.py).
- differentiable, maximize, capturable, foreach flags: fastai optimizers step under no_grad, have no maximize (negate the
  loss) and no CUDA-graph capture; `fused` replaces foreach.
- CUDA and multi-device cases (test_state_dict_with_cuda_params, test_cpu_load_state_dict, multi-GPU mixed devices,
  test_fused_cpu_matches_cuda): no GPU in CI; load_state_dict moves state to each parameter's device.
- peak memory and >2^31-element tensors: measured by `fastopt bench`, not unit tests.
- grad scaler's found_inf inside fused steps: fastai's MixedPrecision skips the whole step before the optimizer runs
  (test_mixed_precision.py)."""
import copy
import pytest
import torch
import fastopt

def params(): return [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]

def test_optimizer_can_be_printed():
    opt = fastopt.Lamb([params(), params()], lr=1e-3)
    text = repr(opt)
    assert 'Optimizer' in text and isinstance(text, str)

@pytest.mark.parametrize('fused', [False, True], ids=['eager', 'fused'])
def test_tensor_lr_steps_like_a_float_lr(fused):
    "A 0-d tensor learning rate (torch.optim's test_tensor_lr) gives the float's steps"
    g = torch.Generator().manual_seed(0)
    a, b = params(), params()
    for p,q in zip(a, b): q.data.copy_(p)
    oa = fastopt.Adam(a, lr=torch.tensor(0.01), fused=fused)
    ob = fastopt.Adam(b, lr=0.01, fused=fused)
    for _ in range(4):
        for p,q in zip(a, b): p.grad = torch.randn(p.shape, generator=g); q.grad = p.grad.clone()
        oa.step(); ob.step()
    for p,q in zip(a, b): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

def test_deepcopy_copies_every_public_attribute():
    opt = fastopt.StableAdam(params(), lr=1e-3)
    for p in opt.param_lists[0]: p.grad = torch.ones_like(p)
    opt.step()
    public = lambda o: {k for k in o.__dict__ if not k.startswith('_')}
    twin = copy.deepcopy(opt)
    assert public(twin) == public(opt) and twin.hypers == opt.hypers and twin.hyper_names == opt.hyper_names

def test_default_dtype_float64_leaves_float32_state_float32():
    "torch.set_default_dtype(float64) must not leak into a float32 parameter's state"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ps = [torch.randn(4, 3, dtype=torch.float32, requires_grad=True)]
        opt = fastopt.AMSGrad(ps, lr=1e-3)
        ps[0].grad = torch.ones(4, 3, dtype=torch.float32)
        opt.step()
        assert ps[0].dtype == torch.float32
        assert all(v.dtype == torch.float32 for k,v in opt.state[ps[0]].items() if torch.is_tensor(v) and k != 'step')
    finally: torch.set_default_dtype(old)

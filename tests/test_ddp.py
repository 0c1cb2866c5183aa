"""fastopt optimizers under `DistributedDataParallel`: two CPU processes with the gloo backend, each stepping a fastopt
optimizer on its half of every batch of scikit-learn's digits through a DDP-wrapped conv net (no BatchNorm), in float64.

Cases: eager Adam, Lamb, StableAdam and BAdam; Adam with L2 decay (which adds λp to `p.grad` in place) under
`gradient_as_bucket_view=True` (where `p.grad` is a view of DDP's communication bucket); and Adam with `fused=True`
(torch.compile inside each rank). Two parameter groups (conv body, linear head) with learning rates changed every step
(a cosine schedule, the head's 3x the body's), wd=0.1, and one bias with `do_wd=False`. For each case:
- the ranks are bit-identical: parameters after every step, and the whole optimizer state dict (state tensors, flags,
  hypers) at the end;
- rank 0 equals, bit for bit, one process that averages the gradients of the two half batches itself (g0/2 + g1/2 is
  exact in floating point apart from the one rounding of the sum, and so is what DDP computes); fused Adam, whose
  compiled step may round differently from the eager one, skips this and is compared with eager Adam below;
- rank 0 matches one process stepping on the full batch: parameters, state tensors and the loss within
  `TOL` = rtol=atol=1e-10, except BAdam's state, within `BADAM_STATE_TOL` (see there). A full-batch gradient differs
  from the mean of two half-batch ones in the last bits, so this cannot be bitwise. Largest parameter differences
  measured: 8e-13 for BAdam, 4e-15 for Adam with L2, 3e-16 or less for the rest (fused Adam included). TOL leaves
  room for other kernels and thread counts (with 2 threads in the single process, Adam's differences reach 4e-13)
  and still catches any real discrepancy: DDP gradients half their size move the parameters by 1e-6 to 1e-1.
The bucket-view case zeroes gradients with the optimizer's own `zero_grad`, which fastai's version (`p.grad.detach_()`) fails on.
Each rank saves its results with `torch.save` to a pytest tmp dir; they are compared in the pytest process."""
import contextlib, functools, math, os, time, traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastopt
from spawning import start, join_or_fail

WORLD = 2
N_STEPS = 10
BS = 64               # full batch per step; rank r takes rows r::WORLD of it
DTYPE = torch.float64 # gloo and DDP reduce float64, so the comparison with one process on the full batch can be tight
TOL = dict(rtol=1e-10, atol=1e-10)
# BAdam's Φ divides the change in gradient by the last update, which on this net shrinks to ~1e-16 for the biases
# (their Φ averages reach 6e10): the last-bit difference between a full-batch gradient and the mean of two half-batch
# gradients then shows up as relative differences up to ~5e-5 in BAdam's Φ average and last update. One process
# averaging half-batch gradients itself, without DDP, differs from the full batch just as much.
BADAM_STATE_TOL = dict(rtol=1e-3, atol=1e-10)
JOIN_TIMEOUT = 300    # seconds for a whole spawn: process start, imports, every case, the fused case's compile

# BAdam's lr is relative to each tensor's mean |p|: at 1e-2 the second conv's bias moves only ~1e-5 in N_STEPS steps
HYPERS = dict(Adam=dict(lr=1e-2, wd=0.1), Lamb=dict(lr=1e-2, wd=0.1), StableAdam=dict(lr=1e-2, wd=0.1),
              BAdam=dict(lr=0.3, wd=0.1, beta=5.))
CASES = {f'{n}-eager': dict(name=n, fused=False) for n in HYPERS}
# fastai's `Optimizer.zero_grad` calls `p.grad.detach_()`, which raises on DDP's bucket views; fastopt's does not
CASES['Adam-L2-bucket_view'] = dict(name='Adam', fused=False, hypers=dict(decouple_wd=False), ddp=dict(gradient_as_bucket_view=True))
CASES['Adam-fused'] = dict(name='Adam', fused=True)
EAGER = [c for c in CASES if not CASES[c]['fused']]

# ---------------------------------------------------------------- the problem, shared by the DDP ranks and the references

def digits_batches():
    "N_STEPS deterministic full batches of digits: ((BS,1,8,8) float64 images, normalized over the whole set; int labels)"
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=DTYPE)
    X = ((X - X.mean()) / X.std()).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:N_STEPS * BS].view(N_STEPS, BS)
    return [(X[i], y[i]) for i in idx]

def make_model():
    "A small conv net without BatchNorm (a half batch computes the same function as the full one); the same weights every call"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).to(DTYPE)

def lr_at(t, base):
    "One learning rate per group (the head's 3x the body's), on a cosine schedule, so the hypers change every step"
    f = 0.5 * (1 + math.cos(math.pi * t / N_STEPS))
    return [base * f, 3 * base * f]

def train(case, mode, rank=0):
    """Step the optimizer of `CASES[case]` N_STEPS times and return the results. `mode`: 'ddp' (this process is rank
    `rank` of WORLD and steps on its rows of each batch), 'full' (one process, the full batch) or 'split' (one process
    that sets each gradient to the mean of the WORLD half-batch gradients, as DDP does)"""
    c = CASES[case]
    model = make_model()
    net = DDP(model, **c.get('ddp', {})) if mode == 'ddp' else model
    hypers = {**HYPERS[c['name']], **c.get('hypers', {})}
    base_lr = hypers.pop('lr')
    body, head = list(model[:4].parameters()), list(model[4:].parameters())
    opt = getattr(fastopt, c['name'])([body, head], lr=base_lr, fused=c['fused'], **hypers)
    opt.state[model[2].bias]['do_wd'] = False
    init = [p.detach().clone() for p in model.parameters()]
    losses, checksums = [], []
    for t, (xb, yb) in enumerate(digits_batches()):
        opt.set_hyper('lr', lr_at(t, base_lr))
        if mode == 'split':
            halves = []
            for r in range(WORLD):
                model.zero_grad()
                loss = nn.functional.cross_entropy(model(xb[r::WORLD]), yb[r::WORLD])
                loss.backward()
                halves.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
            for i, p in enumerate(model.parameters()): p.grad = sum(gs[i] / WORLD for _, gs in halves)
            losses.append(sum(l for l, _ in halves) / WORLD)
        else:
            if mode == 'ddp': xb, yb = xb[rank::WORLD], yb[rank::WORLD]
            loss = nn.functional.cross_entropy(net(xb), yb)   # a mean over the rows: DDP's average is the full-batch mean
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        checksums.append(torch.stack([p.detach().sum() for p in model.parameters()]))
    res = dict(params=[p.detach().clone() for p in model.parameters()], init=init, opt=opt.state_dict(),
               still_fused=opt.fused, losses=torch.tensor(losses, dtype=torch.float64), checksums=torch.stack(checksums))
    return res

@contextlib.contextmanager
def num_threads(n):
    "Run the block with `n` intra-op threads, as the ranks do (on 2 busy cores, 2 OpenMP threads can make a step 10x slower)"
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)

@functools.lru_cache(maxsize=None)
def single_process(case, mode):
    "One process running `case` in `mode` ('full' or 'split'), with one thread"
    with num_threads(1): return train(case, mode)

# ---------------------------------------------------------------- the DDP side

def _worker(rank, init_method, out_dir, cases):
    "One rank: join the gloo group, run every case, save each one's results (or its traceback) to out_dir"
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=init_method, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        for case in cases:
            t0 = time.perf_counter()
            try: res = train(case, 'ddp', rank)
            except Exception: res = dict(error=traceback.format_exc())
            res['seconds'] = time.perf_counter() - t0
            torch.save(res, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
    finally: dist.destroy_process_group()

def run_ddp(cases, out_dir):
    "Spawn WORLD ranks that run `cases`; return {case: [rank 0's results, rank 1's, ...]}"
    ctx = start(_worker, (f"file://{out_dir}/store", str(out_dir), cases), WORLD)
    join_or_fail(ctx, JOIN_TIMEOUT, f"the DDP ranks running {cases} (a rank stuck in a collective?)")
    return {c: [torch.load(out_dir / f"{c}-rank{r}.pt", weights_only=False) for r in range(WORLD)] for c in cases}

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "Every case in one spawn, the fused one last: starting the ranks (importing torch and fastai) takes longer than the eager cases"
    return run_ddp(list(CASES), tmp_path_factory.mktemp('ddp'))

def ranks_of(runs, case):
    "The ranks' results for `case`, after checking that no rank raised"
    for r, res in enumerate(runs[case]): assert 'error' not in res, f"{case} raised on rank {r}:\n{res['error']}"
    return runs[case]

# ---------------------------------------------------------------- checks

def state_items(sd):
    "(parameter index, key, value) for every entry of the per-parameter state in an optimizer state dict"
    return [(i, k, v) for i, s in enumerate(sd['state']) for k, v in sorted(s.items())]

def assert_same_keys(sa, sb, what):
    assert [(i, k) for i, k, _ in sa] == [(i, k) for i, k, _ in sb], f"optimizer state keys differ {what}"

def assert_bit_identical(a, b, what, per_step=True):
    "Results `a` and `b` agree bit for bit: parameters (and their per-step checksums), every entry of the optimizer state dict"
    assert len(a['params']) == len(b['params']) > 0
    for i, (p, q) in enumerate(zip(a['params'], b['params'])): assert torch.equal(p, q), f"parameter {i} differs {what}"
    if per_step: assert torch.equal(a['checksums'], b['checksums']), f"the parameters differed after some step {what}"
    sa, sb = state_items(a['opt']), state_items(b['opt'])
    assert_same_keys(sa, sb, what)
    assert any(isinstance(v, torch.Tensor) and v.ndim > 0 for _, _, v in sa), "no state tensors to compare"
    for (i, k, v), (_, _, w) in zip(sa, sb):
        if isinstance(v, torch.Tensor): assert torch.equal(v, w), f"state {k!r} of parameter {i} differs {what}"
        else: assert v == w, f"state {k!r} of parameter {i} differs {what}: {v!r} vs {w!r}"
    rest = lambda sd: {k: v for k, v in sd.items() if k != 'state'}   # hypers, callback names, what has stepped
    assert rest(a['opt']) == rest(b['opt']), f"the optimizer state dicts' {sorted(rest(a['opt']))} differ {what}"

def errors(a, b, tol):
    "max |a-b|, max |a-b|/|b|, and max |a-b|/(atol + rtol|b|): the share of `tol` used (assert_close fails above 1)"
    d = (a - b).abs()
    return d.max().item(), (d / b.abs().clamp_min(1e-300)).max().item(), (d / (tol['atol'] + tol['rtol'] * b.abs())).max().item()

def assert_close_to(ddp, ref, label, state_tol=TOL):
    "`ddp` (rank 0, with both ranks' losses) matches `ref` (one process on the full batch): parameters, state tensors, losses"
    perr, serr = [], []
    for i, (p, q) in enumerate(zip(ddp['params'], ref['params'])):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{label}: parameter {i}: {m}")
        perr.append(errors(p, q, TOL))
    sd, sr = state_items(ddp['opt']), state_items(ref['opt'])
    assert_same_keys(sd, sr, f"between {label} and one process")
    for (i, k, v), (_, _, w) in zip(sd, sr):
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, w, **state_tol, msg=lambda m: f"{label}: state {k!r} of parameter {i}: {m}")
            serr.append(errors(v, w, state_tol))
        else: assert v == w, f"{label}: state {k!r} of parameter {i}: {v!r} vs {w!r}"
    # each rank's loss is the mean over its half of the batch, so the ranks' mean is the full batch's loss
    torch.testing.assert_close(sum(ddp['rank_losses']) / WORLD, ref['losses'], **TOL)
    fmt = lambda es: '/'.join(f"{m:.1e}" for m in map(max, zip(*es)))
    print(f"\n{label} vs one process on the full batch, max abs/rel err/share of tol: params {fmt(perr)}, "
          f"state {fmt(serr)}; rank run {ddp['seconds']:.1f} s")

def assert_trained(res, label):
    "The run did something worth comparing: every parameter moved by far more than TOL, and the loss went down"
    for i, (p, p0) in enumerate(zip(res['params'], res['init'])):
        assert (p - p0).abs().max() > 1e5 * TOL['atol'], f"{label}: parameter {i} barely moved, so matching within TOL would mean little"
    assert res['losses'][-1] < res['losses'][0], f"{label}: the loss did not go down: {res['losses'].tolist()}"

def with_losses(ranks): return dict(ranks[0], rank_losses=[res['losses'] for res in ranks])

# ---------------------------------------------------------------- tests

@pytest.mark.parametrize('case', EAGER)
def test_ddp_ranks_bit_identical(runs, case):
    "Under 2-rank gloo DDP both ranks hold bit-identical parameters after every step, and identical optimizer state and hypers"
    r0, r1 = ranks_of(runs, case)
    assert_bit_identical(r0, r1, 'between the ranks')

@pytest.mark.parametrize('case', EAGER)
def test_ddp_equals_one_process_averaging_half_batches(runs, case):
    "Rank 0 equals, bit for bit, one process stepping on the mean of the two half-batch gradients"
    assert_bit_identical(ranks_of(runs, case)[0], single_process(case, 'split'), 'from one process averaging half batches')

@pytest.mark.parametrize('case', EAGER)
def test_ddp_matches_one_process_on_full_batch(runs, case):
    "Rank 0 matches one process stepping on the full batch within TOL (BAdam's state within BADAM_STATE_TOL)"
    ref = single_process(case, 'full')
    assert_trained(ref, case)
    state_tol = BADAM_STATE_TOL if CASES[case]['name'] == 'BAdam' else TOL
    assert_close_to(with_losses(ranks_of(runs, case)), ref, case, state_tol)

def test_ddp_fused_adam(runs):
    "Fused Adam (torch.compile in each rank) under DDP stays fused, keeps the ranks bit-identical and matches eager Adam on the full batch"
    r0, r1 = ranks_of(runs, 'Adam-fused')
    assert r0['still_fused'] and r1['still_fused'], 'a rank fell back to eager, so this would not test the fused path'
    assert_bit_identical(r0, r1, 'between the ranks')
    assert_close_to(with_losses([r0, r1]), single_process('Adam-eager', 'full'), 'Adam-fused')

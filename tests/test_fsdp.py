"""fastopt optimizers on FSDP2 (`fully_shard`) parameters: gloo processes on the CPU, float64.

The model is a small BatchNorm CNN whose shards are uneven on 2 ranks (5 output channels split 3/2, a 3-row linear
head split 2/1) and partly empty on 4 (5 rows split 2/2/1/0, 3 rows 1/1/1/0); `fully_shard` wraps every conv and
linear and then the root (which takes the BatchNorm's parameters). Two parameter groups: the body and the head.
A sharded run is compared with one process that accumulates the same per-rank pieces of each batch (each rank's loss
is the mean over its rows; FSDP2 averages the ranks' gradients, so the one process adds loss/WORLD of each piece).
BatchNorm normalizes over each rank's rows, so a run over 4 ranks computes a different function from one over 2;
each is compared with the one process accumulating the same number of pieces.

One 2-rank spawn runs all the 2-rank cases (its startup costs more than they do), one 4-rank spawn the resharded load:
- `exact`: all 18 optimizers eager, and Lamb, UM, PreLamb and StableAdam with `fused=True` (Lamb, UM and PreLamb compiled
  on flat copies of each rank's shards, one `_ShardBucket` per group; StableAdam's per-channel stats keep it eager), N_STEPS
  steps: the parameters after every step, and the gradients the step leaves (PreLamb rescales them), equal the one
  process within `TOL` on both ranks; every state tensor with a value per element or per output channel is sharded (Shard(0)), anything else is a
  0-d scalar, and the ranks' shares add up to the one process's state; no operation in an extra step makes a tensor
  larger than the largest local parameter shard (nothing gathered to full size); the collectives of every step of
  every group, counted by `step_collectives` (CommDebugMode), are `expected_collectives`: no all-gather, and one
  all-reduce per tensor per reduction helper call; a compiled step (counted in its graph, as CommDebugMode cannot run
  under torch.compile) has one all-reduce per helper call for the whole group. The compiled cases skip the
  largest-temporary check (a dispatch mode would break the compiled call); their flat buffers hold one group's local shards.
- `ckpt`: after 2 steps, `sharded_state_dict` is saved with `torch.distributed.checkpoint`; a fresh model and
  optimizer load it and continue bit-identically to the uninterrupted run. One process (no process group) and 4 ranks
  load the same checkpoint and continue within `RESHARD_TOL` of the one-process reference.
- `digits`: fastai's `Learner` on scikit-learn's digits under `Learner.sharded_ctx` (FSDP2 per block, `rank_split`
  data): the ranks agree on the validation accuracy and on every parameter; the accuracy is within the spread of
  one-process runs over seeds; `Learner.save_sharded` writes a checkpoint that one process loads and validates to the
  same accuracy.
The ranks' init uses a FileStore in pytest's tmp dir, so parallel runs on one machine cannot clash on a port."""
import contextlib, functools, math, os, time, traceback
from functools import partial
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

import fastopt
from spawning import start, join_or_fail
from fastopt.sharding import sharded_state_dict, load_sharded_state_dict, step_collectives, local

# helpers.SEED_OPTIMIZERS and fastai's four namesakes (named here: importing the registry costs every spawned rank ~2 s)
NAMES = ['Adam', 'AMSGrad', 'RAdam', 'Lamb', 'SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'AdamAWD', 'UM', 'PreLamb', 'DuvAdam',
         'SUAdam', 'BAdam', 'SGD', 'RMSProp', 'QHAdam', 'Larc']
HYPERS = dict(SUAdam=dict(lr=0.3), BAdam=dict(lr=0.3, beta=5.), DuvAdam=dict(lr=0.3), SGD=dict(lr=0.1, mom=0.9), Larc=dict(lr=1.))
N_STEPS, BS, DTYPE = 4, 12, torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
RESHARD_TOL = dict(rtol=1e-12, atol=1e-14)
# fused=True: DTensor parameters step on flat copies of each rank's shards (one compiled graph per group, its
# all-reduces counted in the graph), except for per-channel optimizers, whose DTensor parameters step eagerly
FUSED = ['Lamb', 'UM', 'PreLamb', 'StableAdam']   # PreLamb changes the gradients, which the flat copies then give back
if os.environ.get('FASTOPT_FSDP_ALL_FUSED'): FUSED = NAMES   # all 18 fused: ~15 compiles per rank, too slow for every run
PER_CHANNEL = {'AdamGC', 'StableAdam', 'AdamAWD'}
CASES = NAMES + [f'{n}-fused' for n in FUSED]
CKPT_NAMES = ['Lamb', 'StableAdam', 'BAdam']   # per-tensor norms, per-channel state (init_rms), previous-step state
JOIN_TIMEOUT = 600

# Collectives per step of each group (body: conv, BN, conv: 5 tensors; head: linear weight and bias). The per-tensor
# helpers (`fastopt.flat.tensor_norm` etc.) all-reduce the partial sums of one call at once: one all-reduce per tensor
# per helper call. Per-channel reductions are local under Shard(0): none. BAdam's first step has no previous update.
HELPER_CALLS = dict(Lamb=1, UM=1, PreLamb=1, SUAdam=1, Larc=1, BAdam=2)
BODY, HEAD = 5, 2

# ---------------------------------------------------------------- the problem

def make_model():
    "Conv (no bias: BN follows) - BN - ReLU - conv - ReLU - linear; the same weights every call"
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 5, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 3)).to(DTYPE)

def shard(model):
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)): fully_shard(m)
    return fully_shard(model)

def batches(n=N_STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BS, 1, 8, 8, generator=g, dtype=DTYPE), torch.randint(0, 3, (BS,), generator=g)) for _ in range(n)]

def make_opt(name, model, fused=False):
    ps = list(model.parameters())
    return getattr(fastopt, name)([ps[:5], ps[5:]], fused=fused, **{'lr': 1e-2, **HYPERS.get(name, {})})

def full(t): return t.full_tensor() if isinstance(t, DTensor) else t
def snapshot(model, grads=False):
    "The parameters, gathered; and then their gradients if `grads` (what a callback such as PreLamb's leaves in them)"
    return [full(p.detach()).clone() for p in model.parameters()] + ([full(p.grad).clone() for p in model.parameters()] if grads else [])

def backward(model, xb, yb, world, rank=None):
    "rank None: one process accumulating the `world` pieces; otherwise this rank's piece"
    for r in (range(world) if rank is None else [rank]):
        loss = nn.functional.cross_entropy(model(xb[r::world]), yb[r::world])
        (loss / world if rank is None else loss).backward()

def train(model, opt, bs, world, rank=None, count=False, watch=None):
    "Step on `bs`; return the parameters and gradients after each step (and, if `count`, each step's collectives per group), each step under `watch` if given"
    snaps, counts = [], []
    for xb, yb in bs:
        backward(model, xb, yb, world, rank)
        with watch or contextlib.nullcontext():
            if count: counts.append([dict(c) for c in step_collectives(opt)])
            else: opt.step()
        snaps.append(snapshot(model, grads=True))
        opt.zero_grad()
    return snaps, counts

# ---------------------------------------------------------------- what a rank checks about itself

class LargestLocal(torch.utils._python_dispatch.TorchDispatchMode):
    "The most elements any operation's output holds on this rank (a DTensor's local shard)"
    def __init__(self): super().__init__(); self.most = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor): self.most = max(self.most, local(o).numel())
        return out

def counting_backend(graphs, gm, example_inputs):
    "inductor (with fastopt's options), after appending the number of all-reduces in the graph to `graphs`"
    from torch._inductor.compile_fx import compile_fx
    graphs.append(sum(1 for n in gm.graph.nodes if n.op == 'call_function' and 'all_reduce' in str(n.target)))
    return compile_fx(gm, example_inputs, config_patches=fastopt.Optimizer.inductor_options)

def state_layout(opt):
    "For every state tensor: (parameter index, key, placements or None for a plain tensor, global shape, local numel)"
    res = []
    for i, p in enumerate(opt._all_params()):
        for k, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor):
                res.append((i, k, tuple(v.placements) if isinstance(v, DTensor) else None, tuple(v.shape), local(v).numel()))
    return res

def state_bytes(opt):
    "Bytes of optimizer state this rank holds: (state with a value per element or per channel, 0-d state)"
    vs = [v for p in opt._all_params() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return (sum(local(v).numel() * v.element_size() for v in vs if v.ndim > 0), sum(v.element_size() for v in vs if v.ndim == 0))

def job_exact(rank, world, out):
    res = {}
    for case in CASES:
        name, fused = case.split('-')[0], case.endswith('fused')
        model = shard(make_model())
        opt = make_opt(name, model, fused)
        compiled = fused and name not in PER_CHANNEL
        graphs = []
        if compiled: opt.fused_backend,opt.inductor_options = partial(counting_backend, graphs),None
        # torch.compile cannot run under CommDebugMode: a compiled step's all-reduces are counted in its graph instead
        snaps, counts = train(model, opt, batches(), world, rank, count=not compiled)
        extra = dict(graphs=graphs, still_fused=opt.fused, buckets={g: [type(b).__name__ for b in f.buckets.values()] for g, f in opt._flat.items()})
        mode = LargestLocal()   # on a step of its own: under CommDebugMode it would also see the ops inside DTensor's dispatch
        if not compiled: train(model, opt, batches(N_STEPS + 1)[-1:], world, rank, watch=mode)
        res[case] = dict(snaps=snaps, counts=counts, **extra, layout=state_layout(opt), state_bytes=state_bytes(opt),
                         largest_temp=mode.most, largest_shard=max(local(p).numel() for p in model.parameters()))
    return res

def plain(sd):
    "An optimizer state dict with each DTensor gathered: what another process can load"
    return {**sd, 'state': [{k: full(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in sd['state']]}

def job_ckpt(rank, world, out):
    res = {}
    for name in CKPT_NAMES:
        model = shard(make_model())
        opt = make_opt(name, model)
        bs = batches()
        train(model, opt, bs[:2], world, rank)
        dcp.save(sharded_state_dict(model, opt), checkpoint_id=os.path.join(out, f'ckpt-{name}'))
        going, _ = train(model, opt, bs[2:], world, rank)
        model2 = shard(make_model())
        opt2 = make_opt(name, model2)
        load_sharded_state_dict(model2, opt2, os.path.join(out, f'ckpt-{name}'))
        resumed, _ = train(model2, opt2, bs[2:], world, rank)
        res[name] = dict(going=going, resumed=resumed, sd=plain(opt.state_dict()), sd2=plain(opt2.state_dict()))
    return res

def job_reshard(rank, world, out):
    res = {}
    for name in CKPT_NAMES:
        model = shard(make_model())
        opt = make_opt(name, model)
        load_sharded_state_dict(model, opt, os.path.join(out, f'ckpt-{name}'))
        res[name], _ = train(model, opt, batches()[2:], world, rank)
    return res

DIGITS = dict(opt='Lamb', lr=3e-2, epochs=2)

def digits_fit(learn):
    learn.fit_one_cycle(DIGITS['epochs'], DIGITS['lr'])
    return learn.recorder.values[-1][-1]   # accuracy on the validation set

def job_digits(rank, world, out):
    from fastopt.digits import digits_learner
    learn = digits_learner(getattr(fastopt, DIGITS['opt']), seed=0)
    with learn.no_bar(), learn.sharded_ctx():
        n_batches = len(learn.dls.train)
        acc = digits_fit(learn)
        learn.save_sharded(os.path.join(out, 'ckpt-digits'))
    sizes = [local(p).numel() for p in learn.model.parameters()]
    return dict(acc=acc, params=snapshot(learn.model), n_batches=n_batches, local_sizes=sizes,
                state_bytes=state_bytes(learn.opt), bn=[b.clone() for b in learn.model.buffers()])

JOBS = dict(exact=job_exact, ckpt=job_ckpt, reshard=job_reshard, digits=job_digits)

# ---------------------------------------------------------------- spawning

def _worker(rank, world, out, jobs):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f"file://{out}/store-{world}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        for job in jobs:
            t0 = time.perf_counter()
            try: res = JOBS[job](rank, world, out)
            except BaseException: res = dict(error=traceback.format_exc())   # DCP raises CheckpointException, a BaseException
            torch.save(dict(res=res, seconds=time.perf_counter() - t0), os.path.join(out, f"{job}-{world}-rank{rank}.pt"))
    finally: dist.destroy_process_group()

def spawn(world, jobs, out):
    t0 = time.perf_counter()
    ctx = start(_worker, (world, str(out), jobs), world)
    join_or_fail(ctx, JOIN_TIMEOUT, f"the {world} ranks running {jobs}")
    res = {}
    for job in jobs:
        ranks = [torch.load(out / f"{job}-{world}-rank{r}.pt", weights_only=False) for r in range(world)]
        for r, d in enumerate(ranks):
            if 'error' in d['res']: pytest.fail(f"{job} raised on rank {r} of {world}:\n{d['res']['error']}")
        print(f"\n{job} on {world} ranks: {max(d['seconds'] for d in ranks):.1f} s (spawn total {time.perf_counter() - t0:.1f} s)")
        res[job] = [d['res'] for d in ranks]
    return res

@pytest.fixture(scope='module')
def out(tmp_path_factory): return tmp_path_factory.mktemp('fsdp')

@pytest.fixture(scope='module')
def two(out): return spawn(2, ['exact', 'ckpt', 'digits'], out)

@pytest.fixture(scope='module')
def four(two, out): return spawn(4, ['reshard'], out)   # after `two`, which writes the checkpoints

@functools.lru_cache(maxsize=None)
def reference(name, world=2, ckpt=None):
    "One process accumulating `world` pieces of each batch; from a checkpoint (steps 3 on) if `ckpt`"
    torch.set_num_threads(1)
    model = make_model()
    opt = make_opt(name, model)
    bs = batches()
    if ckpt:
        load_sharded_state_dict(model, opt, ckpt)
        bs = bs[2:]
    return train(model, opt, bs, world)[0]

def assert_snaps_close(a, b, tol, label):
    assert len(a) == len(b) > 0
    for t, (sa, sb) in enumerate(zip(a, b)):
        for i, (p, q) in enumerate(zip(sa, sb)):
            what = f'parameter {i}' if i < len(sa) // 2 else f'gradient {i - len(sa) // 2}'
            torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{label}: {what} after step {t + 1}: {m}")

def rel_err(a, b): return max(((p - q).abs().max() / q.abs().max()).item() for sa, sb in zip(a, b) for p, q in zip(sa, sb))

# ---------------------------------------------------------------- tests

def test_names_are_every_optimizer():
    "The fourteen seed algorithms and fastai's four namesakes (the modern four are checked under FSDP2 by tests/test_modern.py)"
    from helpers import SEED_OPTIMIZERS
    assert NAMES == list(SEED_OPTIMIZERS) + ['SGD', 'RMSProp', 'QHAdam', 'Larc']

@pytest.mark.parametrize('case', CASES)
def test_fsdp_equals_one_process(two, case):
    "Under FSDP2 with uneven shards, every optimizer's parameters (eager, and fused where given) equal one process's after every step, on both ranks"
    name = case.split('-')[0]
    ref = reference(name)
    init = [p.detach() for p in make_model().parameters()]
    for i, (p, p0) in enumerate(zip(ref[-1], init)):   # LARS scales each step by |p|: a zero-initialized tensor (BN's bias) stays 0
        assert (p - p0).abs().max() > 1e-6 or (name == 'Larc' and not p0.any()), f"{name}: parameter {i} barely moved"
    for r, res in enumerate(two['exact']):
        assert_snaps_close(res[case]['snaps'], ref, TOL, f"{case} rank {r}")
    print(f"{case}: max relative error {rel_err(two['exact'][0][case]['snaps'], ref):.1e}")

def expected_collectives(name, step):
    n = HELPER_CALLS.get(name, 0) - (name == 'BAdam' and step == 1)
    return [{'all_reduce': n * BODY} if n else {}, {'all_reduce': n * HEAD} if n else {}]

@pytest.mark.parametrize('case', CASES)
def test_fsdp_collectives(two, case):
    "Each step issues the collectives of `expected_collectives`: none for elementwise and per-channel optimizers, no all-gather; a fused step one graph per group with one all-reduce per helper call"
    name = case.split('-')[0]
    if case.endswith('fused') and name not in PER_CHANNEL:
        for r, res in enumerate(two['exact']):
            assert res[case]['still_fused'] is True, f"{case} rank {r} fell back to eager"
            assert res[case]['buckets'] == {0: ['_ShardBucket'], 1: ['_ShardBucket']}, f"{case} rank {r}: {res[case]['buckets']}"
            assert res[case]['graphs'] and all(n == HELPER_CALLS.get(name, 0) for n in res[case]['graphs']), f"{case} rank {r}: all-reduces per graph {res[case]['graphs']}"
        return
    for r, res in enumerate(two['exact']):
        for t, counts in enumerate(res[case]['counts']):
            assert counts == expected_collectives(case.split('-')[0], t + 1), f"{case} rank {r} step {t + 1}: {counts}"

@pytest.mark.parametrize('case', CASES)
def test_fsdp_state_sharded(two, case):
    "State the size of a parameter is sharded like it, per-channel state with its channels; each rank holds its share; no step makes anything larger than a local shard"
    name = case.split('-')[0]
    ps = list(make_model().parameters())
    for r, res in enumerate(two['exact']):
        layout = res[case]['layout']
        assert layout, f"{case}: no state tensors"
        for i, k, placements, shape, n in layout:
            p = ps[i]
            if len(shape) == p.ndim > 0 and shape[0] == p.shape[0]:   # per element or per output channel
                assert placements == (Shard(0),), f"{case} rank {r}: state {k!r} of parameter {i} is {placements}, not sharded"
            else:
                assert n == 1, f"{case} rank {r}: state {k!r} of parameter {i} has shape {shape}, neither per element, per channel nor per tensor"
        assert res[case]['largest_temp'] <= res[case]['largest_shard'], \
            f"{case} rank {r}: a step made a tensor of {res[case]['largest_temp']} values, larger than any local shard ({res[case]['largest_shard']})"
    one = one_process_state_bytes(name)
    per_rank = [res[case]['state_bytes'] for res in two['exact']]
    assert sum(b for b, _ in per_rank) == one[0], f"{case}: the ranks' sharded state {per_rank} does not add up to one process's {one}"
    assert max(b for b, _ in per_rank) <= 0.7 * one[0]
    print(f"{case}: optimizer state per rank {per_rank} bytes (sharded, replicated 0-d), one process {one}")

def one_process_state_bytes(name):
    model = make_model()
    opt = make_opt(name, model)
    xb, yb = batches()[0]
    backward(model, xb, yb, 2)
    opt.step()
    return state_bytes(opt)

@pytest.mark.parametrize('name', CKPT_NAMES)
def test_checkpoint_resumes_bit_identically(two, name):
    "Loaded on the 2 ranks that saved it, a sharded checkpoint continues bit for bit like the run that saved it"
    for r, res in enumerate(two['ckpt']):
        d = res[name]
        for t, (a, b) in enumerate(zip(d['going'], d['resumed'])):
            for i, (p, q) in enumerate(zip(a, b)): assert torch.equal(p, q), f"{name} rank {r}: parameter {i} differs {t + 1} steps after the load"
        sa, sb = d['sd'], d['sd2']
        assert sa['hypers'] == sb['hypers'] and sa['stepped'] == sb['stepped']
        for i, (s1, s2) in enumerate(zip(sa['state'], sb['state'])):
            assert sorted(s1) == sorted(s2)
            for k in s1:
                v, w = s1[k], s2[k]
                if isinstance(v, torch.Tensor): assert torch.equal(v, w), f"{name} rank {r}: state {k!r} of parameter {i} differs"
                else: assert v == w

@pytest.mark.parametrize('name', CKPT_NAMES)
def test_checkpoint_loads_in_one_process(two, out, name):
    "One process, no process group, loads the 2-rank checkpoint and continues like the 2 ranks did"
    resumed = reference(name, 2, str(out / f'ckpt-{name}'))
    assert_snaps_close(two['ckpt'][0][name]['going'], resumed, RESHARD_TOL, f"{name} loaded in one process")

@pytest.mark.parametrize('name', CKPT_NAMES)
def test_checkpoint_reshards_to_four_ranks(four, out, name):
    "4 ranks (shards 2/2/1/0 and 1/1/1/0 rows) load the 2-rank checkpoint and continue like one process on 4 pieces"
    ref = reference(name, 4, str(out / f'ckpt-{name}'))
    for r, res in enumerate(four['reshard']): assert_snaps_close(res[name], ref, RESHARD_TOL, f"{name} on 4 ranks, rank {r}")

@functools.lru_cache(maxsize=None)
def digits_one_process(seed):
    from fastopt.digits import digits_learner
    torch.set_num_threads(1)
    learn = digits_learner(getattr(fastopt, DIGITS['opt']), seed=seed)
    with learn.no_bar(): return digits_fit(learn), learn

def test_digits_sharded_recipe(two, out):
    "`Learner.sharded_ctx` on 2 ranks: the ranks agree, each saw half of every batch, the accuracy is within one process's seed spread"
    r0, r1 = two['digits']
    assert r0['acc'] == r1['acc']
    for i, (p, q) in enumerate(zip(r0['params'], r1['params'])): assert torch.equal(p, q), f"parameter {i} differs between the ranks"
    for a, b in zip(r0['bn'], r1['bn']): assert torch.equal(a, b), "BatchNorm buffers differ between the ranks"
    accs = [digits_one_process(s)[0] for s in range(3)]
    lo, hi = min(accs), max(accs)
    spread = max(hi - lo, 0.01)
    print(f"digits {DIGITS}: 2 ranks {r0['acc']:.4f}, one process over seeds 0-2 {[round(a, 4) for a in accs]}; "
          f"optimizer state per rank {r0['state_bytes']}/{r1['state_bytes']} bytes")
    assert lo - spread <= r0['acc'] <= hi + spread
    assert r0['acc'] > 0.9
    _, one = digits_one_process(0)
    assert r0['n_batches'] == len(one.dls.train)
    assert sum(r0['local_sizes']) + sum(r1['local_sizes']) == sum(p.numel() for p in one.model.parameters())
    assert r0['state_bytes'][0] + r1['state_bytes'][0] == state_bytes(one.opt)[0]
    assert max(r0['state_bytes'][0], r1['state_bytes'][0]) <= 0.55 * state_bytes(one.opt)[0]

def test_digits_checkpoint_in_one_process(two, out):
    "`Learner.load_sharded` in one process restores the 2-rank model: the same validation accuracy"
    from fastopt.digits import digits_learner
    learn = digits_learner(getattr(fastopt, DIGITS['opt']), seed=1)
    learn.load_sharded(str(out / 'ckpt-digits'))
    for i, (p, q) in enumerate(zip(learn.model.parameters(), two['digits'][0]['params'])): assert torch.equal(p.detach(), q), f"parameter {i}"
    with learn.no_bar(): acc = learn.validate()[1]
    assert acc == pytest.approx(two['digits'][0]['acc'], abs=1e-6)

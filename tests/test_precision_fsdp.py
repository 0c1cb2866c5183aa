"""Low-precision modes on sharded (DTensor, `Shard(0)`) parameters, 2 gloo ranks, against one process on the same
gradients, eager and fused (each rank's shards in flat buffers, one compiled graph). Shards are uneven (7 rows split 4/3). Bit-exact where the math is elementwise and blocks agree:
bf16 weights with Kahan compensation or stochastic rounding (the random bits depend on each value's position in the
whole parameter, not in the shard), and 8-bit state of a parameter whose shards start on a 64-value block boundary
(96×64: 48 rows of 64 each). Where a shard starts inside a block (7×1000: rank 1 starts at value 4000, 62.5 blocks in),
each rank quantizes its own blocks, so the codes differ from one process's in the two blocks around the boundary:
that parameter is compared within 8-bit quantization error instead. Lamb's per-tensor norm is all-reduced, so its
weights agree within a bf16 unit rather than bit for bit."""
import os
from datetime import timedelta
import pytest
import torch
import torch.distributed as dist
from spawning import start, join_or_fail, save_rank, rank_results

SHAPES = [(96, 64), (7, 1000), (12,)]
CASES = [('Adam', dict()), ('Adam', dict(stochastic_round=True)), ('Adam', dict(state_dtype='8bit')), ('Lamb', dict(state_dtype='8bit'))]
CASES = [(n, {**m, 'fused': f}) for f in (False, True) for n,m in CASES]   # fused: dynamo's graph run by aot_eager (inductor's code is checked in test_precision)
STEPS = 3

def problem():
    g = torch.Generator().manual_seed(0)
    ps = [(torch.randn(s, generator=g) * 0.5).bfloat16() for s in SHAPES]
    gs = [[torch.randn(s, generator=g).bfloat16() for s in SHAPES] for _ in range(STEPS)]
    return ps, gs

def run(name, modes, mesh=None):
    "Steps on the problem's parameters (sharded over `mesh` if given); the weights, compensations and dequantized state, as full tensors"
    import fastopt
    from fastopt.precision import is_quantized, dequantize
    ps, gs = problem()
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor, Shard
        ps = [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in ps]
        gs = [[distribute_tensor(x, mesh, [Shard(0)]) for x in g] for g in gs]
    else: ps = [torch.nn.Parameter(p) for p in ps]
    opt = getattr(fastopt, name)(ps, lr=1e-2, **modes)
    opt.fused_backend = 'aot_eager'
    for g in gs:
        for p,x in zip(ps, g): p.grad = x
        opt.step()
    full = lambda t: t.full_tensor() if hasattr(t, 'full_tensor') else t
    res = []
    flat = [b for f in opt._flat.values() for b in f.buckets.values()]
    for p in ps:
        st = {k: full(dequantize(v) if is_quantized(v) else v) for k,v in opt.state[p].items() if k != 'step'}
        res.append(dict(p=full(p.detach()), state=st, fused=opt.fused is not False and any(any(q is p for q in b.params) for b in flat)))   # no fallback to eager
    return res

def _ckpt_model():
    "A model whose 8-bit weights' shards start on a block boundary (64×96: 32 rows of 96 a rank) and inside a block (7×1000: rank 1 starts 62.5 blocks in)"
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(1000, 7), torch.nn.ReLU(), torch.nn.Linear(7, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))

def _ckpt_state(opt) -> list:
    "Each parameter's state: 8-bit codes and scales of this rank, and every value as a full float32 tensor"
    import fastopt.precision as P
    full = lambda t: t.full_tensor() if hasattr(t, 'full_tensor') else t
    out = []
    for p in opt._all_params():
        st = {}
        for k,v in opt.state[p].items():
            if P.is_quantized(v): st[k] = dict(codes=v['codes'].to_local().clone(), scale=v['scale'].clone(), values=full(P.dequantize(v)))
            elif isinstance(v, torch.Tensor) and v.ndim: st[k] = dict(values=full(v).float())
        out.append(st)
    return out

def checkpoint_roundtrip(path) -> dict:
    "Step a `fully_shard`ed model with 8-bit Adam state, save it with torch.distributed.checkpoint, load it into a fresh model and optimizer; both states, and the weights after one more step of each"
    import fastopt
    from torch.distributed.fsdp import fully_shard
    from fastopt.sharding import sharded_state_dict, load_sharded_state_dict
    import torch.distributed.checkpoint as dcp
    def make():
        model = _ckpt_model()
        for m in model:
            if isinstance(m, torch.nn.Linear): fully_shard(m)
        return fully_shard(model), None
    def step(model, opt, seed):
        torch.manual_seed(seed)
        model(torch.randn(5, 1000)).square().mean().backward()
        opt.step(); opt.zero_grad()
    model,_ = make()
    opt = fastopt.Adam(model.parameters(), lr=1e-2, state_dtype='8bit', fused=False)
    for s in range(2): step(model, opt, s)
    dcp.save(sharded_state_dict(model, opt), checkpoint_id=path)
    model2,_ = make()
    opt2 = fastopt.Adam(model2.parameters(), lr=1e-2, state_dtype='8bit', fused=False)
    load_sharded_state_dict(model2, opt2, path)
    before,after = _ckpt_state(opt),_ckpt_state(opt2)
    step(model, opt, 2); step(model2, opt2, 2)
    full = lambda t: t.full_tensor() if hasattr(t, 'full_tensor') else t
    return dict(before=before, after=after, weights=[full(p.detach()) for p in model.parameters()], weights2=[full(p.detach()) for p in model2.parameters()])

def _worker(rank, world, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f"file://{out}/store", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh('cpu', (world,))
        def compute():
            res = {f'{n} {m}': run(n, m, mesh) for n,m in CASES}
            return {**res, 'ckpt': checkpoint_roundtrip(os.path.join(out, 'ckpt')), 'ckpt_path': os.path.join(out, 'ckpt')}
        save_rank(out, rank, compute)
    finally: dist.destroy_process_group()

@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp('precision-fsdp')
    join_or_fail(start(_worker, (2, str(out)), 2), 300, 'the 2 ranks running the precision modes')
    return rank_results(out, 2)

@pytest.mark.parametrize('name,modes', CASES, ids=[f'{n}-{m}' for n,m in CASES])
def test_sharded_modes_equal_one_process(sharded, name, modes):
    one = run(name, modes)
    for rank in range(2):
        got = sharded[rank][f'{name} {modes}']
        for i,(a,b) in enumerate(zip(one, got)):
            assert a['fused'] == b['fused'] == modes['fused'], f"rank {rank}, parameter {i}: stepped {'fused' if b['fused'] else 'eagerly'}, one process {'fused' if a['fused'] else 'eagerly'}"
            exact = name != 'Lamb' and not (modes.get('state_dtype') == '8bit' and SHAPES[i] == (7, 1000))
            if exact: assert torch.equal(a['p'], b['p']), f"rank {rank}, parameter {i}: weights differ"
            else:
                ulp = 2**-7 * a['p'].float().abs().clamp_min(2**-10)
                assert ((a['p'].float() - b['p'].float()).abs() <= ulp).all(), f"rank {rank}, parameter {i}: weights differ by more than a bf16 unit"
            assert a['state'].keys() == b['state'].keys()
            if not exact and 'weight_comp' in a['state']:   # the weights the step sees: within 8-bit error in the update, lr = 1e-2 a step
                full_a,full_b = (a['p'].float() + a['state']['weight_comp'].float()),(b['p'].float() + b['state']['weight_comp'].float())
                assert (full_a - full_b).abs().max() <= STEPS * 1e-2 / 8, f"rank {rank}, parameter {i}: compensated weights differ"
            for k in a['state']:
                if k == 'weight_comp' and not exact: continue
                x,y = a['state'][k].float(),b['state'][k].float()
                if exact: assert torch.equal(x, y), f"rank {rank}, parameter {i}: {k} differs"
                else: assert ((x - y).abs() <= x.abs().max() / 8 + 1e-30).all(), f"rank {rank}, parameter {i}: {k} beyond 8-bit error"

def test_sharded_8bit_checkpoint_resumes_bit_identical(sharded):
    "8-bit state saved with torch.distributed.checkpoint and loaded on the same ranks has the same codes and scales, and the next step gives the same weights"
    for rank in range(2):
        d = sharded[rank]['ckpt']
        n8 = 0
        for i,(a,b) in enumerate(zip(d['before'], d['after'])):
            assert a.keys() == b.keys(), f"rank {rank}, parameter {i}: state {sorted(a)} before, {sorted(b)} after"
            for k in a:
                for part in a[k]: assert torch.equal(a[k][part], b[k][part]), f"rank {rank}, parameter {i}: {k} {part} differs after the round trip"
                n8 += 'codes' in a[k]
        assert n8 == 4, f"rank {rank}: {n8} 8-bit state tensors (expected Adam's two for each of the two large weights)"
        for i,(w,w2) in enumerate(zip(d['weights'], d['weights2'])): assert torch.equal(w, w2), f"rank {rank}, parameter {i}: weights differ a step after resuming"

def test_sharded_8bit_checkpoint_loads_in_one_process(sharded, tmp_path_factory):
    "The same checkpoint loaded without sharding: the same values where the shards started on a block boundary, within 8-bit error where a shard started inside a block"
    import fastopt
    from fastopt.sharding import load_sharded_state_dict
    import fastopt.precision as P
    model = _ckpt_model()
    opt = fastopt.Adam(model.parameters(), lr=1e-2, state_dtype='8bit', fused=False)
    load_sharded_state_dict(model, opt, sharded[0]['ckpt_path'])
    for i,(p,ranks) in enumerate(zip(opt._all_params(), sharded[0]['ckpt']['before'])):
        for k,want in ranks.items():
            v = opt.state[p][k]
            got = P.dequantize(v) if P.is_quantized(v) else v.float()
            exact = tuple(p.shape) != (7, 1000)
            if exact: assert torch.equal(got, want['values']), f"parameter {i} {tuple(p.shape)}: {k} differs"
            else: assert ((got - want['values']).abs() <= want['values'].abs().max() / 8).all(), f"parameter {i}: {k} beyond 8-bit error"
            assert P.is_quantized(v) == ('codes' in want), f"parameter {i}: {k} stored differently"

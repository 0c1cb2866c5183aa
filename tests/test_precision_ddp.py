"""Low-precision modes under `DistributedDataParallel`: 2 gloo ranks train a bf16 MLP on their halves of each batch with
Adam in each mode (Kahan compensation; stochastic rounding; Kahan with 8-bit state), eagerly and fused (dynamo's
graph run by aot_eager; inductor's code is checked in test_precision). The ranks must hold bit-identical weights and
state after every step: stochastic rounding's bits depend on the seed, the parameter's position and each value's
index, not on the rank. Rank 0 must equal, bit for bit, one process that averages the two half-batch gradients
itself (DDP divides each rank's bf16 gradient by 2, exactly, and gloo adds the two halves with one rounding)."""
from datetime import timedelta
import pytest
import torch
import torch.distributed as dist
from torch import nn
from spawning import start, join_or_fail, save_rank, rank_results

WORLD, STEPS, BS = 2, 4, 8
MODES = {'kahan': dict(kahan_sum=True), 'stochastic': dict(stochastic_round=True), 'kahan-8bit': dict(state_dtype='8bit')}
CASES = [(m, f) for f in (False, True) for m in MODES]

def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BS, 64, generator=g).bfloat16(), torch.randn(BS, 64, generator=g)) for _ in range(STEPS)]

def train(mode, fused, rank=None):
    "Weights, state dict and per-step weight checksums after STEPS steps: as DDP rank `rank`, or (None) one process averaging the half-batch gradients"
    import fastopt
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 64)).bfloat16()   # 6,144-value weights: 8-bit state
    net = DDP(model) if rank is not None else model
    opt = fastopt.Adam(model.parameters(), lr=1e-2, fused=fused, **MODES[mode])
    opt.fused_backend = 'aot_eager'
    loss_of = lambda x, y: nn.functional.mse_loss(net(x).float(), y)
    sums = []
    for x,y in batches():
        if rank is not None: loss_of(x[rank::WORLD], y[rank::WORLD]).backward()
        else:
            halves = []
            for r in range(WORLD):
                model.zero_grad()
                loss_of(x[r::WORLD], y[r::WORLD]).backward()
                halves.append([p.grad.clone() for p in model.parameters()])
            for i,p in enumerate(model.parameters()): p.grad = sum(h[i] / WORLD for h in halves)
        opt.step(); opt.zero_grad()
        sums.append(torch.stack([p.detach().float().sum() for p in model.parameters()]))
    flat = [b for f in opt._flat.values() for b in f.buckets.values()]
    return dict(params=[p.detach().clone() for p in model.parameters()], opt=opt.state_dict(), sums=torch.stack(sums),
                fused=opt.fused is not False and bool(flat))

def _worker(rank, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f"file://{out}/store", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300))
    try: save_rank(out, rank, lambda: {c: train(*c, rank=rank) for c in CASES})
    finally: dist.destroy_process_group()

@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('precision-ddp')
    join_or_fail(start(_worker, (str(out),), WORLD), 300, 'the DDP ranks running the precision modes')
    return rank_results(out, WORLD)

def _tensors(sd):
    "Every tensor in an optimizer state dict's per-parameter state (8-bit codes and scales included), with where it is"
    out = []
    for i,s in enumerate(sd['state']):
        for k,v in sorted(s.items()):
            for part,t in (sorted(v.items()) if isinstance(v, dict) else [('', v)]):
                if isinstance(t, torch.Tensor): out.append((f"{k}{'.' + part if part else ''} of parameter {i}", t))
    return out

def assert_same(a, b, what):
    for i,(p,q) in enumerate(zip(a['params'], b['params'])): assert torch.equal(p, q), f"parameter {i} differs {what}"
    assert torch.equal(a['sums'], b['sums']), f"the weights differed after some step {what}"
    ta,tb = _tensors(a['opt']),_tensors(b['opt'])
    assert [n for n,_ in ta] == [n for n,_ in tb] and ta, f"the state holds other tensors {what}"
    for (n,x),(_,y) in zip(ta, tb): assert torch.equal(x, y), f"{n} differs {what}"

@pytest.mark.parametrize('mode,fused', CASES, ids=[f"{m}-{'fused' if f else 'eager'}" for m,f in CASES])
def test_ddp_ranks_and_one_process_agree(ranks, mode, fused):
    r0,r1 = ranks[0][(mode, fused)],ranks[1][(mode, fused)]
    assert r0['fused'] == r1['fused'] == fused, f"fused={fused} but the ranks stepped {'fused' if r0['fused'] else 'eagerly'}"
    assert_same(r0, r1, 'between the ranks')
    one = train(mode, fused)
    assert_same(r0, one, 'from one process averaging the half-batch gradients')
    if 'kahan' in mode: assert any('weight_comp' in n for n,_ in _tensors(one['opt']))
    if '8bit' in mode: assert any('codes' in n for n,_ in _tensors(one['opt']))
    if mode == 'stochastic': assert any('round_count' in n for n,_ in _tensors(one['opt']))

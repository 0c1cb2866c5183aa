"""The flat layout of the fused path.

- The reduction helpers on a `FlatLayout` give every block its tensor's (or output channel's) value of the plain
  per-tensor op (float32 within 1e-6), padding and empty trailing blocks ignored; with `layout=None` they are the plain ops.
- The fused optimizer keeps parameters, gradients and state as views of its flat buffers, and when something moves them
  away (`.double()`, channels_last, a re-assigned `.data`, `zero_grad(set_to_none=True)`, a new parameter group, a
  parameter that stops getting gradients, a stat that returns a fresh tensor) it lays them out again or steps them
  eagerly, with the results of the eager path (rtol 1e-5) and frozen parameters bit-identical.
- One graph per bucket whatever the number of tensors: a new model of another size reuses it without recompiling, and
  a second optimizer of the same kind (new `partial` callbacks included) runs the first one's compiled step without tracing.
- A group is one bucket unless `fused_chunk_bytes` asks for chunks (that no step stores a temporary of the buffers'
  size is checked in test_fused.py).
"""
from functools import partial
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
import fastopt
from fastopt.flat import *

def random_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 64), (5,), (2, 2, 4, 8), (130,), (1,), (7, 3)]
    return [torch.randn(s, generator=g) for s in shapes]

@pytest.mark.parametrize('fn', [tensor_sum, tensor_mean, tensor_norm])
def test_tensor_reductions_match_the_plain_ops(fn):
    ts = random_tensors()
    lay = FlatLayout(ts)
    buf = lay.pack(ts)
    buf.view(-1)[-BLOCK:] = 1e6   # the trailing empty block is not any tensor's
    res = fn(buf, layout=lay)
    assert res.shape == (lay.ntensors, 1, 1)   # one value per tensor...
    spread = lay.spread(res)   # ...and in each of its blocks
    assert spread.shape == (lay.nblocks, 1)
    for i,t in enumerate(ts):
        torch.testing.assert_close(res[i, 0, 0], fn(t), rtol=1e-6, atol=1e-6)
        for b in range(lay.first_block[i], lay.first_block[i + 1]):
            torch.testing.assert_close(spread[b, 0], fn(t), rtol=1e-6, atol=1e-6)
    two = fn(buf, 2 * buf, layout=lay)   # several tensors in one call
    torch.testing.assert_close(two[1], fn(2 * buf, layout=lay))

def test_channel_reductions_match_the_plain_ops():
    ts = random_tensors()[:4]   # rows of 64 and 32*... : (3, 64), (5,), (2, 2, 4, 8) has rows of 64, (130,)
    lay = FlatLayout(ts, channels=True)
    buf = lay.pack(ts)
    for fn in (channel_sum, channel_mean):
        res = fn(buf, layout=lay)
        for i in (0, 2):
            per_channel = fn(ts[i]).reshape(-1)
            blocks = res[lay.first_block[i]:lay.first_block[i + 1], 0]
            torch.testing.assert_close(blocks, per_channel.repeat_interleave(len(blocks) // len(per_channel)), rtol=1e-6, atol=1e-6)
    assert tensor_ndim(ts[2]) == 4 and tensor_ndim(buf, lay)[:, 0, 0].tolist() == [2, 1, 4, 1, 0]   # and 0 for the trailing empty tensor

def test_unaligned_channels_are_refused():
    with pytest.raises(ValueError, match=r'rows of 21 elements'): FlatLayout([torch.zeros(7, 3, 7)], channels=True)
    assert channel_aligned(torch.zeros(7, 3, 7)) is False and channel_aligned(torch.zeros(5)) is True

def test_views_keep_shape_strides_and_zero_padding():
    ts = random_tensors() + [torch.randn(4, 6).t(), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    lay = FlatLayout(ts)
    buf = lay.pack(ts)
    for v,t in zip(lay.views(buf), ts): assert torch.equal(v, t) and v.stride() == t.stride()
    real = sum(t.numel() for t in ts)
    assert buf.numel() - real == (lay.valid().numel() - lay.valid().sum()).item() and buf[~lay.valid()].abs().sum() == 0

# The optimizer on flat buffers: the pitfalls

def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 4, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 5 * 5, 3))

def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)

def in_buffers(opt):
    "Whether every fused parameter, its gradient and its state are views of the flat buffers"
    ok = []
    for flat in opt._flat.values():
        for b in flat.buckets.values():
            base = b.p.untyped_storage().data_ptr()
            for p in b.params:
                ok.append(p.untyped_storage().data_ptr() == base and (p.grad is None or p.grad.untyped_storage().data_ptr() == b.g.untyped_storage().data_ptr()))
                ok += [opt.state[p][k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr() for k,v in b.state.items()]
    return bool(ok) and all(ok)

def freeze_conv(t, m, opt):
    "Freeze the conv for steps 2 to 4, as fastai's freeze with set_to_none gradients would"
    for p in m[0].parameters():
        p.requires_grad_(not 2 <= t < 5)
        if 2 <= t < 5: p.grad = None

PITFALLS = {
    'double': lambda t, m, opt: t == 3 and m.double(),
    'channels_last': lambda t, m, opt: t == 3 and m.to(memory_format=torch.channels_last),
    'data_reassigned': lambda t, m, opt: t == 3 and setattr(m[3].weight, 'data', m[3].weight.data.clone()),
    'frozen_then_unfrozen': freeze_conv,
    'set_to_none': lambda t, m, opt: None,
}

def run_pitfall(name, fused):
    m = model()
    opt = fastopt.Adam(list(m.parameters()), lr=1e-2, fused=fused)
    x, y = data()
    for t in range(7):
        PITFALLS[name](t, m, opt)
        if t == 2: before = m[0].weight.detach().clone()
        loss = nn.functional.cross_entropy(m(x.to(m[0].weight.dtype)), y)
        loss.backward()
        opt.step()
        if name == 'frozen_then_unfrozen' and 2 <= t < 5: assert torch.equal(m[0].weight, before), 'a frozen parameter moved'
        if name == 'set_to_none': m.zero_grad(set_to_none=True)
        else: opt.zero_grad()
    return m, opt

@pytest.mark.parametrize('name', list(PITFALLS))
def test_pitfalls_step_like_eager(name):
    counters.clear()
    fm, fopt = run_pitfall(name, True)
    em, _ = run_pitfall(name, False)
    assert fopt.fused and fopt._flat, 'the fused path did not run'
    for p,q in zip(fm.parameters(), em.parameters()):
        assert p.dtype == q.dtype and p.stride() == q.stride()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if name != 'double': assert in_buffers(fopt)
    if name == 'channels_last': assert fm[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not counters['recompiles'], dict(counters['recompiles'])

def fresh_avg(p, mom, grad_avg=None, **kwargs):
    "A functional stat: a new tensor every step"
    return {'grad_avg': (torch.zeros_like(p.grad) if grad_avg is None else grad_avg) * mom + p.grad}

def avg_step(p, lr, grad_avg, **kwargs): p.data.sub_(grad_avg * lr)

def test_stat_returning_a_fresh_tensor_and_a_new_group():
    "A stat that returns new tensors, and a parameter group added after some steps, step as eagerly"
    def go(fused):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(5, 3, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()]
        extra = [torch.randn(4, generator=g).requires_grad_()]
        opt = fastopt.Optimizer(ps, [fresh_avg, avg_step], fused=fused, lr=0.1, mom=0.9)
        for t in range(6):
            if t == 3:
                opt.param_lists.append(extra); opt.hypers.append(dict(opt.hypers[0]))
            for p in opt._all_params(): p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return opt._all_params(), opt
    fused, opt = go(True)
    eager, _ = go(False)
    assert opt.fused and len(opt._flat) == 2 and in_buffers(opt)
    for p,q in zip(fused, eager): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

def test_a_group_cut_into_chunks_steps_like_one():
    "A group larger than `fused_chunk_bytes` is cut between parameters into buckets that run one compiled graph; per-tensor reductions (Lamb) and resume are unchanged"
    def go(fused, chunk, steps=5):
        m = model()
        opt = fastopt.Lamb(list(m.parameters()), lr=1e-2, fused=fused)
        opt.fused_chunk_bytes = chunk
        x, y = data()
        for _ in range(steps):
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step(); opt.zero_grad()
        return m, opt
    torch._dynamo.reset(); counters.clear()
    fm, fopt = go(True, 2048)   # the conv weight (512 values, 2 KiB) alone, the BN and linear tensors split over the rest
    assert fopt.fused and len(fopt._flat[0].buckets) >= 3 and in_buffers(fopt), list(fopt._flat[0].buckets)
    assert {k[:-1] for k in fopt._flat[0].buckets} == {next(iter(fopt._flat[0].buckets))[:-1]} and len(fopt._fns) == 1, 'the chunks should share one graph'
    assert not counters['recompiles'], dict(counters['recompiles'])
    em, eopt = go(False, 2048)
    for p,q in zip(fm.parameters(), em.parameters()): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    um, uopt = go(True, 2**24)
    assert len(uopt._flat[0].buckets) == 1
    for p,q in zip(fm.parameters(), um.parameters()): assert torch.equal(p, q), 'chunking changed the arithmetic'
    sd = fopt.state_dict()
    for s,t in zip(sd['state'], eopt.state_dict()['state']):
        for k in s: torch.testing.assert_close(s[k], t[k], rtol=1e-5, atol=1e-6)

def test_a_group_is_one_bucket_unless_chunks_are_asked_for():
    "A group's fused parameters of one kind are one bucket whatever their size and optimizer; `fused_chunk_bytes` cuts any optimizer's between parameters"
    from fastopt.fused import _GroupLayouts
    for name in ('Adam', 'SAdam', 'Lamb', 'AdamGC'):
        for size, limit, want in ((2**21, None, [5]), (512, 4096, [2, 2, 1])):   # 5 of 8 MiB (more than the 30 MiB chunks reductions had), 5 of 2 KiB
            ps = [torch.randn(size // 64, 64, requires_grad=True) for _ in range(5)]   # whole rows of 64: per-channel AdamGC lays them out
            opt = getattr(fastopt, name)(ps, lr=1e-2, fused=True)
            if limit: opt.fused_chunk_bytes = limit
            for p in ps: p.grad = torch.randn_like(p)
            opt.step()   # the first step is eager and creates the state
            buckets = _GroupLayouts(opt, ps).buckets
            assert [len(b.params) for b in buckets.values()] == want, (name, limit, list(buckets))

def test_chunks_cut_between_parameters():
    from fastopt.fused import _chunks
    ps = [torch.zeros(100), torch.zeros(10), torch.zeros(3000), torch.zeros(1)]   # 128, 64, 3008 and 64 values in blocks
    test = [[len(c) for c in _chunks(ps, limit)] for limit in (4 * 192, 4 * 191, 4 * 10**6)]
    assert test == [[2, 1, 1], [1, 1, 1, 1], [4]], test
    assert [len(c) for c in _chunks([torch.zeros(5, dtype=torch.float64) for _ in range(3)], 8 * 128)] == [2, 1], 'bytes, not values: a float64 block takes 512'

def test_one_graph_serves_models_of_any_size():
    "Sizes are dynamic: a second optimizer over more, differently shaped tensors reuses the compiled step (no new trace, no new inductor compile)"
    def steps(shapes):
        ps = [torch.randn(s).requires_grad_() for s in shapes]
        opt = fastopt.SGD(ps, lr=0.1, mom=0.9, fused=True)
        for _ in range(3):
            for p in ps: p.grad = torch.ones_like(p)
            opt.step()
        return opt
    torch._dynamo.reset(); counters.clear()
    steps([(3, 4), (5,)])
    first = counters['inductor']['fxgraph_cache_miss'] + counters['inductor']['fxgraph_cache_hit']
    counters.clear()
    opt = steps([(7, 9), (2,), (1000,), (3, 3, 3)])
    assert opt.fused and counters['inductor']['fxgraph_cache_miss'] == 0, dict(counters['inductor'])
    assert first >= 1
    assert not counters['stats'].get('unique_graphs') and not counters['recompiles'], \
        f"the second optimizer should run the first one's compiled step without tracing it again: {dict(counters['stats'])} {dict(counters['recompiles'])}"

def test_new_partials_share_the_compiled_step():
    "Each DuvAdam builds its own `functools.partial` callbacks; with the same functions and arguments, a second optimizer runs the first one's compiled step"
    def run():
        ps = [torch.randn(4, 3).requires_grad_()]
        opt = fastopt.DuvAdam(ps, lr=1e-2, fused=True)
        opt.fused_backend = 'eager'   # dynamo's trace is what is shared; inductor's code is not needed for that
        for _ in range(3):
            ps[0].grad = torch.ones_like(ps[0])
            opt.step()
        return opt
    torch._dynamo.reset(); counters.clear()
    a, b = run(), run()
    assert any(isinstance(c, partial) and c is not d for c,d in zip(a.cbs, b.cbs)), 'the builder should make new partials'
    assert a.fused and a._fns and {id(f) for f in a._fns.values()} == {id(f) for f in b._fns.values()}
    assert counters['stats']['unique_graphs'] == 1 and not counters['recompiles'], (dict(counters['stats']), dict(counters['recompiles']))

def test_the_process_keeps_the_most_recently_used_steps():
    "At most `shared_steps_kept` compiled steps wait for later optimizers; a hit makes one the most recent, the oldest goes first"
    from fastopt import fused
    old, fused.shared_steps_kept = fused.shared_steps_kept, 2
    try:
        a, b = fused.shared_step(('test', 'a'), 'eager'), fused.shared_step(('test', 'b'), 'eager')
        assert fused.shared_step(('test', 'a'), 'eager') is a
        fused.shared_step(('test', 'c'), 'eager')   # b is now the least recently used
        assert len(fused._shared_steps) == 2 and fused.shared_step(('test', 'a'), 'eager') is a
        assert fused.shared_step(('test', 'b'), 'eager') is not b
        assert fused.shared_step(None, 'eager') is not fused.shared_step(None, 'eager'), 'no key: a step of its own'
    finally: fused.shared_steps_kept = old

def test_dtensor_parameters_step_fused_on_their_shards():
    "FSDP2's DTensor parameters are never re-pointed (FSDP owns their storage): they step fused on flat copies of their shards (`_ShardBucket`), as with fused=False (tests/test_fsdp.py: 2 ranks, uneven shards)"
    import socket, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        def go(fused):
            torch.manual_seed(0)
            m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
            fully_shard(m)
            opt = fastopt.Adam(list(m.parameters()), lr=1e-2, fused=fused)
            g = torch.Generator().manual_seed(1)
            for _ in range(3):
                m(torch.randn(4, 8, generator=g)).sum().backward(); opt.step(); opt.zero_grad()
            return [p.full_tensor() for p in m.parameters()], opt
        fused, opt = go(True)
        eager, _ = go(False)
        assert opt.fused and [type(b).__name__ for b in opt._flat[0].buckets.values()] == ['_ShardBucket'] and not opt._flat[0].unfit
        for p,q in zip(fused, eager): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    finally: dist.destroy_process_group()

def test_inductor_options_merge_over_the_flat_ones():
    "The fused graphs get `flat_inductor_options` (and `recompute_inductor_options` where a callback reduces) under the user's `inductor_options`; another backend gets the user's alone"
    from fastopt.flat import flat_inductor_options, RealizeColumns
    opt = fastopt.Adam([torch.zeros(3, requires_grad=True)], lr=1e-3, fused=True)
    assert opt._compile_options() == flat_inductor_options and isinstance(opt._compile_options()['post_grad_custom_post_pass'], RealizeColumns)
    from torch._inductor.custom_graph_pass import CustomGraphPass
    assert isinstance(flat_inductor_options['post_grad_custom_post_pass'], CustomGraphPass), 'inductor caches graphs only with a CustomGraphPass'
    opt.inductor_options = {'cpp.dynamic_threads': False, 'max_autotune': True}
    assert opt._compile_options() == {**flat_inductor_options, 'cpp.dynamic_threads': False, 'max_autotune': True}
    opt.fused_backend = 'aot_eager'
    assert opt._compile_options() == {'cpp.dynamic_threads': False, 'max_autotune': True}
    lamb = fastopt.Lamb([torch.zeros(3, requires_grad=True)], lr=1e-3, fused=True)
    assert lamb._compile_options() == {**flat_inductor_options, **recompute_inductor_options}, 'a step that reduces recomputes in each pass'
    lamb.inductor_options = {'realize_reads_threshold': 4}
    assert lamb._compile_options()['realize_reads_threshold'] == 4, "the user's options come last"

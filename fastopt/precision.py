"""Weights and state in fewer bits: low-precision weights written back with Kahan compensation or stochastic rounding, and optimizer state stored in bfloat16 or 8 bits per value."""

from __future__ import annotations
import math
import torch
from torch import Tensor
from .flat import BLOCK, is_dtensor

__all__ = ['QBLOCK', 'min_8bit_numel', 'code_values', 'quantize_rows', 'dequantize_rows', 'is_quantized', 'rows', 'unrows',
           'quantize', 'dequantize', 'check_state_dtype', 'low_precision', 'hash_bits', 'round_key', 'random_bits',
           'stochastic_round_bf16', 'kahan_split', 'Precision', 'decode', 'encode', 'precise_step', 'state_nbytes']

QBLOCK = BLOCK  # values per quantization block: one row of the flat layout, so a block never spans two tensors
min_8bit_numel = 4096  # a parameter with fewer values (counted over all ranks) keeps its state in float32

_formats = {True: (4, 3), False: (5, 3)}  # signed blocks: a sign bit, 4 exponent and 3 mantissa bits; never-negative blocks: 5 and 3

def _top(e:int, m:int) -> float: return 2 - 2 ** -m   # the largest magnitude: the top binade is [1, 2)

def _encode_magnitude(a:Tensor, e:int, m:int) -> Tensor:
    "int32 codes of magnitudes `a` (float32, 0 ≤ a < 2) in a float format of `e` exponent bits (bias 2^e - 1, subnormals) and `m` mantissa bits, rounded to nearest; above the largest value, the largest"
    bias = 2 ** e - 1
    a = a.clamp_max(_top(e, m))
    normal = ((a.view(torch.int32) + (1 << (22 - m))) >> (23 - m)) - ((127 - bias) << m)   # the mantissa rounded to m bits; a carry moves into the exponent
    sub = torch.round(a * 2. ** (bias - 1 + m)).to(torch.int32)   # below the smallest normal value: multiples of its 2^-m
    return torch.where(a < 2. ** (1 - bias), sub, normal)

def _decode_magnitude(code:Tensor, e:int, m:int) -> Tensor:
    "The float32 magnitudes that int32 codes stand for in the format of `_encode_magnitude`"
    bias = 2 ** e - 1
    ex,man = code >> m,code & (2 ** m - 1)
    normal = ((ex + (127 - bias)) << 23 | man << (23 - m)).view(torch.float32)
    return torch.where(ex == 0, man.float() * 2. ** (1 - bias - m), normal)

def _decode(code:Tensor, signed) -> Tensor:
    "The values of int32 `code`s in the signed format (the top bit is the sign) where `signed`, else in the unsigned one"
    s = _decode_magnitude(code & 127, *_formats[True])
    s = torch.where(code >= 128, -s, s)
    if signed is True: return s
    u = _decode_magnitude(code, *_formats[False])
    return u if signed is False else torch.where(signed, s, u)

def code_values(
    signed:bool, # The signed format (a sign bit, 4 exponent bits, 3 mantissa bits) or the unsigned one (5 and 3)
) -> Tensor:
    "The values the 8-bit codes 0-255 stand for, in units of their block's power-of-two scale"
    return _decode(torch.arange(256, dtype=torch.int32), signed)

def quantize_rows(
    x:Tensor, # `[n, QBLOCK]` float values, one quantization block a row (zeros where a row is padding)
) -> tuple:
    "8-bit codes `[n, QBLOCK]` (uint8) and per-row scales `[n, 1]` (bfloat16): the power of two at or below the row's largest magnitude, negative for a row with no negative value (which uses the unsigned format)"
    x = x.float()
    unit = (x.abs().amax(1, keepdim=True).view(torch.int32) & 0x7F800000).view(torch.float32)   # 2^floor(log2(absmax)): exact, so that every division below is
    signed = x.amin(1, keepdim=True) < 0
    a = torch.where(unit > 0, x.abs() / unit, 0.)
    code = torch.where(signed, _encode_magnitude(a, *_formats[True]) | torch.where(x < 0, 128, 0), _encode_magnitude(a, *_formats[False]))
    scale = unit.to(torch.bfloat16)
    return code.to(torch.uint8), torch.where(signed, scale, -scale)

def dequantize_rows(
    codes:Tensor, # `[n, QBLOCK]` uint8 codes from `quantize_rows`
    scale:Tensor, # `[n, 1]` their scales
) -> Tensor:
    "The float32 values `codes` stand for"
    return _decode(codes.to(torch.int32), ~torch.signbit(scale)) * scale.float().abs()

def is_quantized(v) -> bool:
    "Whether state value `v` is 8-bit state: a dict of `codes` (uint8, the parameter's shape) and per-block `scale`"
    return isinstance(v, dict) and v.keys() == {'codes', 'scale'}

def _memory_order(x:Tensor) -> Tensor:
    "`x`'s elements in the order they lie in memory (a view where `x` is dense, else in its logical order)"
    if x.ndim == 0: return x.reshape(1)
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    y = x.permute(order)
    return y.reshape(-1)

def rows(x:Tensor) -> Tensor:
    "`x` (a tensor or a DTensor's local shard) as `[nblocks, QBLOCK]` rows in memory order, zero-padded"
    flat = _memory_order(x)
    pad = -flat.numel() % QBLOCK
    if pad: flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, QBLOCK)

def unrows(r:Tensor, like:Tensor) -> Tensor:
    "Rows from `rows` back in `like`'s shape and memory order"
    if like.ndim == 0: return r.reshape(-1)[0].clone()
    order = sorted(range(like.ndim), key=lambda d: -like.stride(d))
    out = r.reshape(-1)[:like.numel()].reshape([like.shape[d] for d in order])
    inv = [order.index(d) for d in range(like.ndim)]
    return out.permute(inv)

def _local(t): return t.to_local() if is_dtensor(t) else t

def quantize(
    x:Tensor, # A float state tensor (a DTensor: each rank quantizes its own shard, in blocks that start at the shard)
) -> dict:
    "8-bit state: `codes` of `x`'s shape (uint8) and one bfloat16 `scale` per block of `QBLOCK` values in memory order"
    xl = _local(x)
    codes,scale = quantize_rows(rows(xl))
    c = unrows(codes, xl)
    if is_dtensor(x):
        from torch.distributed.tensor import DTensor
        c = DTensor.from_local(c.contiguous() if not xl.is_contiguous() else c, x.device_mesh, x.placements, shape=x.shape, stride=x.stride(), run_check=False)
    return {'codes': c, 'scale': scale.view(-1)}

def dequantize(
    q:dict, # 8-bit state from `quantize`
) -> Tensor:
    "The float32 values 8-bit state `q` stands for, in the shape (and sharding) of its codes"
    c = q['codes']
    cl = _local(c)
    x = unrows(dequantize_rows(rows(cl), q['scale'].view(-1, 1)), cl)
    if is_dtensor(c):
        from torch.distributed.tensor import DTensor
        x = DTensor.from_local(x, c.device_mesh, c.placements, shape=c.shape, stride=c.stride(), run_check=False)
    return x

def check_state_dtype(v):
    "Return `v` if it is a valid `state_dtype` (None, a floating dtype, or '8bit'); else raise a `ValueError` naming it"
    if v is None or (isinstance(v, str) and v == '8bit') or (isinstance(v, torch.dtype) and v.is_floating_point): return v
    raise ValueError(f"Invalid state_dtype: {v!r} (expected None for the parameter's dtype, a floating torch dtype such as torch.bfloat16, or '8bit')")

low_precision = (torch.bfloat16, torch.float16)  # weight dtypes whose small updates need compensation or stochastic rounding

def hash_bits(
    x:Tensor, # int64 values in [0, 2^32)
) -> Tensor:
    "A 32-bit integer hash of each of `x` (three xor-shift-multiply rounds; its constants are under 2^31, so int64 never overflows)"
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)

def round_key(seed:int, position:int, count) -> Tensor:
    "The int64 key of one write-back's random bits: a hash of the seed, the parameter's position in its optimizer and its write-back count (a float64 tensor)"
    k = hash_bits(torch.as_tensor((seed * 0x2545F491 + position) & 0xFFFFFFFF, dtype=torch.int64))
    return hash_bits((k + count.to(torch.int64) * 0x1B873593) & 0xFFFFFFFF)

def random_bits(
    key:Tensor, # int64 keys from `round_key`, broadcasting against `index`
    index:Tensor, # int64 positions of the values in their parameter (global over the ranks)
) -> Tensor:
    "32 random bits per value, a pure function of the key and the value's position, so eager, fused and sharded steps draw the same"
    return hash_bits((key + index * 0x2C1B3C6D) & 0xFFFFFFFF)

def stochastic_round_bf16(
    w:Tensor, # float32 values
    bits:Tensor, # int64 random bits, one per value (the low 16 are used)
) -> Tensor:
    "`w` rounded to bfloat16, up or down with the probabilities that make the expected result `w`"
    i = w.view(torch.int32).to(torch.int64) + (bits & 0xFFFF)   # the bits below bfloat16's mantissa plus a uniform 16-bit number: a carry rounds away from zero
    return (i & ~0xFFFF).to(torch.int32).view(torch.float32).to(torch.bfloat16)

def kahan_split(
    w:Tensor, # float32 values
    dtype, # The weights' dtype
) -> tuple:
    "`w` as the nearest `dtype` value and the rest, also in `dtype`: their float32 sum keeps about twice `dtype`'s bits"
    p = w.to(dtype)
    return p, (w - p.float()).to(dtype)

class Precision:
    "An optimizer's choices for low-precision weights and state, and what they mean for each parameter"
    def __init__(self,
        kahan_sum:bool|None=None, # Compensate bfloat16/float16 weights' rounding (None: yes, unless `stochastic_round`)
        stochastic_round:bool=False, # Round bfloat16 weights stochastically instead (no extra buffer)
        state_dtype=None, # Element-wise state's storage: None (the parameter's dtype), a float dtype, or '8bit'
        seed:int=0, # Seed of stochastic rounding's random bits
    ):
        self.kahan_sum,self.stochastic_round,self.state_dtype,self.seed = kahan_sum,stochastic_round,state_dtype,seed

    def weights(self, p:Tensor) -> str|None:
        "How `p`'s new value is written back: 'kahan', 'stochastic', 'nearest' (a low-precision weight) or None (it is updated in place)"
        if p.dtype not in low_precision: return None
        if self.stochastic_round: return 'stochastic'
        return 'nearest' if self.kahan_sum is False else 'kahan'

    def storage(self, p:Tensor):
        "How `p`'s element-wise state is stored: '8bit', a dtype, or None (as the stats make it, in the weight's working dtype)"
        d = self.state_dtype
        if d is None: return p.dtype if p.dtype in low_precision else None
        if d == '8bit': return '8bit' if p.numel() >= min_8bit_numel else torch.float32
        return d

    def active(self, p:Tensor) -> bool:
        "Whether `p` steps through a float32 working copy (its weight or its state is stored in another precision)"
        s = self.storage(p)
        return self.weights(p) is not None or (s is not None and s != p.dtype)

    def check(self, params:list):
        "Raise a `ValueError` naming the choice if it cannot apply to `params`"
        if self.kahan_sum not in (None, True, False): raise ValueError(f"Invalid kahan_sum: {self.kahan_sum!r} (expected None, True or False)")
        if not isinstance(self.stochastic_round, bool): raise ValueError(f"Invalid stochastic_round: {self.stochastic_round!r} (expected True or False)")
        check_state_dtype(self.state_dtype)
        dtypes = {p.dtype for p in params}
        if self.kahan_sum and self.stochastic_round:
            raise ValueError("Invalid kahan_sum: True with stochastic_round=True (choose one way to keep small updates of low-precision weights)")
        if self.kahan_sum and not dtypes & set(low_precision):
            raise ValueError(f"Invalid kahan_sum: True (the parameters are {', '.join(sorted(map(str, dtypes)))}; Kahan summation compensates bfloat16 or float16 weights)")
        if self.stochastic_round:
            bad = dtypes - {torch.bfloat16}
            if bad: raise ValueError(f"Invalid stochastic_round: True for {', '.join(sorted(map(str, bad)))} parameters (stochastic rounding writes bfloat16 weights; "
                                     "use kahan_sum for float16 ones, and nothing for float32 or float64)")

    def __repr__(self): return f"Precision(kahan_sum={self.kahan_sum}, stochastic_round={self.stochastic_round}, state_dtype={self.state_dtype})"

_own = ('weight_comp', 'round_count')  # state the write-back keeps, which the stats and steppers do not see

def _element(v, p:Tensor) -> bool: return isinstance(v, Tensor) and v.ndim > 0 and v.shape == p.shape and v.is_floating_point()

def decode(v):
    "A state value as the stats see it: 8-bit state dequantized, other tensors in float32 if narrower"
    if is_quantized(v): return dequantize(v)
    if isinstance(v, Tensor) and v.dtype in low_precision: return v.float()
    return v

def encode(v, p:Tensor, storage):
    "State value `v` of `p` stored as `storage` says ('8bit', a dtype, or None: as it is); only element-wise float state is converted"
    if storage is None or not _element(v, p): return v
    if storage == '8bit': return quantize(v)
    return v.to(storage)

def _global_index(p:Tensor) -> Tensor:
    "Each of `p`'s (local) values' position in the whole parameter, in memory order, as `p`'s shape (int64)"
    loc = _local(p)
    off = 0
    if is_dtensor(p):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape,offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        off = sum(o * s for o,s in zip(offset, p.stride()))
    idx = torch.arange(loc.numel(), dtype=torch.int64, device=loc.device) + off
    return unrows(rows(idx), loc) if loc.ndim else idx[0]

def precise_step(
    cbs:list, # The optimizer's stats and steppers
    p:Tensor, # A parameter with a gradient
    state:dict, # Its stored state
    hyper:dict, # Its group's hypers
    prec:Precision, # The optimizer's precision choices
    position:int, # `p`'s position in its optimizer (stochastic rounding's random bits depend on it)
) -> dict:
    "Step `p` through float32 working copies of its weight, gradient and state, then store them as `prec` says; return the new state"
    from fastai.optimizer import _update
    mode,storage = prec.weights(p),prec.storage(p)
    own = {k: state[k] for k in _own if k in state}
    st = {k: decode(v) for k,v in state.items() if k not in _own}
    if mode is None: w = p
    else:
        w = p.detach().float()
        if 'weight_comp' in own: w.add_(own['weight_comp'].float())
        w.grad = p.grad.float()
        version = w.grad._version
    for cb in cbs: st = _update(st, cb(w, **{**st, **hyper}))
    if mode is not None:
        if w.grad._version != version: p.grad.copy_(w.grad)   # a stat changed the gradient in place: so does the weight's own
        if mode == 'kahan':
            new,comp = kahan_split(w, p.dtype)
            own['weight_comp'] = comp
        elif mode == 'stochastic':
            count = own.get('round_count')
            count = torch.zeros((), dtype=torch.float64, device=_local(p).device) if count is None else count
            own['round_count'] = count = count + 1
            bits = random_bits(round_key(prec.seed, position, count), _global_index(p))
            new = _stochastic(w, bits)
        else: new = w.to(p.dtype)
        p.data.copy_(new)
    return {**{k: encode(v, p, storage) for k,v in st.items()}, **own}

def _stochastic(w:Tensor, bits:Tensor) -> Tensor:
    "`stochastic_round_bf16` on a tensor or DTensor (whose `bits` are this rank's, a plain tensor)"
    if not is_dtensor(w): return stochastic_round_bf16(w, bits)
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(stochastic_round_bf16(w.to_local(), bits), w.device_mesh, w.placements, shape=w.shape, stride=w.stride(), run_check=False)

def state_nbytes(opt) -> float:
    "Bytes of optimizer state per parameter value: every tensor in `opt.state` (8-bit codes and scales, Kahan compensation, counts) over the parameters' values"
    n,total = 0,0
    for p in opt._all_params():
        n += p.numel()
        for v in opt.state[p].values():
            for t in (v.values() if is_quantized(v) else [v]):
                if isinstance(t, Tensor): total += _local(t).numel() * t.element_size()
    return total / n

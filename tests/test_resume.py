"""Never lose training state. `Learner.save(with_opt=True)` after an epoch, loaded into a fresh `Learner`, continues as the
uninterrupted run: with bit-identical weights, fused here for all 18 optimizers (eagerly for all 22: the kit's `resume_learner`, in tests/test_testing.py). `load_state_dict` refuses what does not fit before changing anything, and copies of an optimizer step
like the original."""
import copy, io, pickle, random
from functools import partial
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.optimizer import Adam as FastaiAdam, SGD as FastaiSGD
import fastopt
from helpers import SEED_OPTIMIZERS as optimizers
from fastopt.digits import digits_learner, digits_hypers

from helpers import NAMESAKE_HYPERS as FASTAI_NAMESAKES
SETTINGS = {**digits_hypers, **FASTAI_NAMESAKES}
ALL = {**optimizers, **{n: getattr(fastopt, n) for n in FASTAI_NAMESAKES}}

class EpochSeededShuffle(Callback):
    "Shuffle each epoch with a seed of its own, so a resumed fit sees the batches the uninterrupted fit saw"
    def before_epoch(self): self.dls.train.rng = random.Random(1000 + self.epoch)

class StopAfterEpoch(Callback):
    "End the fit after epoch `epoch`, as an interrupted job would"
    def __init__(self, epoch): self.stop_at = epoch
    def after_epoch(self):
        if self.epoch == self.stop_at: raise CancelFitException

def learner(name, path, fused):
    hypers = dict(SETTINGS[name])
    lr = hypers.pop('lr')
    return digits_learner(partial(ALL[name], fused=fused, **hypers), path=path, cbs=EpochSeededShuffle()), lr

def fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(*args, **kwargs)

def weights(learn): return [t.detach().clone() for t in learn.model.state_dict().values()]

def uninterrupted_and_resumed(name, path, fused, with_opt=True):
    "Weights after two epochs of fit_one_cycle, straight through and with a save/load between the epochs"
    learn, lr = learner(name, path, fused)
    fit(learn, 2, lr)
    straight = weights(learn)
    learn, lr = learner(name, path, fused)
    fit(learn, 2, lr, cbs=StopAfterEpoch(0))
    learn.save('epoch0', with_opt=with_opt)
    fresh, lr = learner(name, path, fused)
    fresh.load('epoch0', with_opt=with_opt)
    fit(fresh, 2, lr, start_epoch=1)
    return straight, weights(fresh), fresh

# The eager resume through Learner.save/load(with_opt=True) is the kit's `resume_learner` check, run for every optimizer
# in tests/test_testing.py on a smaller Learner (conv, batch norm, two groups); the fused one stays here, on the digits.

@pytest.mark.parametrize('name', list(ALL))
def test_resume_is_bit_identical_fused(name, tmp_path):
    "The state dict says which parameters have stepped, so the resumed optimizer's first step is fused, as the uninterrupted one's"
    straight, resumed, learn = uninterrupted_and_resumed(name, tmp_path, fused=True)
    assert learn.opt.fused, 'the fused path fell back to eager, which would make this comparison vacuous'
    for a,b in zip(straight, resumed): assert torch.equal(a, b), name

def test_resume_without_optimizer_state_differs(tmp_path):
    "The check above can fail: resuming without the optimizer's state does not reproduce the uninterrupted run"
    straight, resumed, _ = uninterrupted_and_resumed('Adam', tmp_path, fused=False, with_opt=False)
    assert not all(torch.equal(a, b) for a,b in zip(straight, resumed))

# load_state_dict: every mismatch is refused before anything changes

def params(*shapes): return [torch.randn(s, requires_grad=True) for s in shapes]

def stepped(opt_func, ps, n=2, **kw):
    opt = opt_func(ps, **kw)
    for _ in range(n):
        for p in (p for pg in opt.param_lists for p in pg): p.grad = torch.randn_like(p)
        opt.step()
    return opt

def snapshot(opt):
    return copy.deepcopy(([dict(h) for h in opt.hypers], [opt.state[p] for pg in opt.param_lists for p in pg]))

def assert_unchanged(opt, before):
    hypers, states = before
    assert [dict(h) for h in opt.hypers] == hypers
    for s,t in zip([opt.state[p] for pg in opt.param_lists for p in pg], states):
        assert s.keys() == t.keys() and all(torch.equal(torch.as_tensor(s[k]), torch.as_tensor(t[k])) for k in s)

BAD_LOADS = [
    ('two groups into one', lambda: stepped(fastopt.Adam, [params(3), params(2)], lr=1e-3), '2 parameter groups, this optimizer has 1'),
    ('one parameter short', lambda: stepped(fastopt.Adam, params(3), lr=1e-3), 'state for 1 parameters, this optimizer has 2'),
    ('a different optimizer', lambda: stepped(fastopt.AMSGrad, params(3, 2), lr=1e-3), 'saved by a different optimizer'),
    ('different hypers (fastai)', lambda: stepped(FastaiSGD, params(3, 2), lr=1e-3), 'saved by a different optimizer'),
    ('a different model', lambda: stepped(fastopt.Adam, params(2, 3), lr=1e-3), "'grad_avg' has shape (2,), the parameter has shape (3,)"),
    ('an invalid hyper', lambda: {**stepped(fastopt.Adam, params(3, 2), lr=1e-3).state_dict(), 'hypers': [dict(lr=-1., mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)]},
     'Invalid lr: -1.0'),
    ('not a state dict', lambda: {'model': {}}, 'not an optimizer state dict'),
]

@pytest.mark.parametrize('case,make,msg', BAD_LOADS, ids=[c for c,*_ in BAD_LOADS])
def test_bad_state_dict_is_refused_before_anything_changes(case, make, msg):
    target = stepped(fastopt.Adam, params(3, 2), lr=1e-3)
    before = snapshot(target)
    src = make()
    sd = src if isinstance(src, dict) else src.state_dict()
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): target.load_state_dict(sd)
    assert_unchanged(target, before)

def test_fastai_state_dict_loads_into_its_namesake():
    "A fastai Adam's state (integer step) loads into fastopt's Adam, which continues exactly as fastai's would"
    ps = [p.detach().double().requires_grad_() for p in params(3, 4)]
    ours = stepped(FastaiAdam, ps, lr=1e-2)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    mine = fastopt.Adam(qs, lr=1e-2)
    mine.load_state_dict(copy.deepcopy(ours.state_dict()))
    for _ in range(3):
        for p,q in zip(ps, qs): p.grad = torch.randn_like(p); q.grad = p.grad.clone()
        ours.step(); mine.step()
    for p,q in zip(ps, qs): torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)

def test_loaded_state_is_a_copy():
    "fastai's state_dict hands out live tensors; two optimizers loaded from one dict must not share moving averages"
    src = stepped(fastopt.Adam, params(3), lr=1e-3)
    sd = src.state_dict()
    a, b = fastopt.Adam(params(3), lr=1e-3), fastopt.Adam(params(3), lr=1e-3)
    a.load_state_dict(sd); b.load_state_dict(sd)
    pa, pb, ps = a.param_lists[0][0], b.param_lists[0][0], src.param_lists[0][0]
    assert a.state[pa]['grad_avg'] is not b.state[pb]['grad_avg'] is not src.state[ps]['grad_avg']
    pa.grad = torch.ones(3); a.step()
    assert torch.equal(b.state[pb]['grad_avg'], src.state[ps]['grad_avg'])

def test_state_dict_loads_with_weights_only():
    "The state dict holds only tensors, numbers, bools, strings, lists and dicts, so torch.load(weights_only=True) reads it"
    opt = stepped(fastopt.StableAdam, params((4, 2, 3, 3), 4), lr=1e-3)
    buf = io.BytesIO(); torch.save(opt.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = fastopt.StableAdam([p.detach().clone().requires_grad_() for p in opt.param_lists[0]], lr=1e-3)
    fresh.load_state_dict(sd)
    for p,q in zip(opt.param_lists[0], fresh.param_lists[0]):
        for k,v in opt.state[p].items(): assert torch.equal(torch.as_tensor(v), torch.as_tensor(fresh.state[q][k])), k

@pytest.mark.parametrize('fused', [True], ids=['fused'])   # eager copies: the kit's `copies` check (tests/test_testing.py)
@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copy_steps_like_the_original(how, fused):
    g = torch.Generator().manual_seed(0)
    opt = fastopt.Lamb([params((4, 3), 3), params(5)], lr=1e-2, wd=0.1, fused=fused)
    for _ in range(3):
        for p in (p for pg in opt.param_lists for p in pg): p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    twin = copy.deepcopy(opt) if how == 'deepcopy' else pickle.loads(pickle.dumps(opt))
    assert twin.fused == fused
    for _ in range(3):
        for pg,qg in zip(opt.param_lists, twin.param_lists):
            for p,q in zip(pg, qg):
                assert p is not q
                p.grad = torch.randn(p.shape, generator=g); q.grad = p.grad.clone()
        opt.step(); twin.step()
    for pg,qg in zip(opt.param_lists, twin.param_lists):
        for p,q in zip(pg, qg): assert torch.equal(p, q)

"fastopt optimizers inside a real fastai Learner on scikit-learn's digits."
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
import fastopt
from functools import partial
from fastopt.registry import optimizers
from fastopt.digits import digits_learner, digits_hypers

class RecordHypers(Callback):
    "Record every group's hypers after each training batch"
    order = 100  # after ParamScheduler (order 60) has set the batch's values
    def before_fit(self): self.hypers = []
    def after_batch(self):
        if self.training: self.hypers.append([dict(h) for h in self.opt.hypers])

def fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(*args, **kwargs)

FASTAI_NAMESAKES = {'Adam', 'AMSGrad', 'RAdam', 'Lamb'}

@pytest.mark.parametrize('name', list(optimizers))
def test_trains_digits(name):
    "Five epochs of fit_one_cycle with the settings in digits_hypers: 90% for the four namesakes, 85% for the others"
    hypers = dict(digits_hypers[name])
    lr = hypers.pop('lr')
    learn = digits_learner(partial(optimizers[name], **hypers))
    fit(learn, 5, lr)
    with learn.no_bar(): _, acc = learn.validate()
    assert acc >= (0.90 if name in FASTAI_NAMESAKES else 0.85), f"{name}: held-out accuracy {acc:.3f}"

def test_compare_knows_every_optimizer():
    "The fourteen seed algorithms and Lion, ADOPT, ScheduleFreeAdamW and Muon, each with its digits settings"
    assert len(optimizers) == 18 and set(optimizers) == set(digits_hypers)

def test_fit_one_cycle_schedules_mom_and_lr():
    rec = RecordHypers()
    learn = digits_learner(fastopt.Adam, cbs=rec)
    fit(learn, 2, 1e-2)
    moms = [h[0]['mom'] for h in rec.hypers]
    lrs = [h[0]['lr'] for h in rec.hypers]
    assert moms[0] == pytest.approx(0.95, abs=1e-3) and min(moms) == pytest.approx(0.85, abs=1e-3)
    assert len(set(moms)) > 10 and len(set(lrs)) > 10
    assert max(lrs) == pytest.approx(1e-2, rel=1e-3)

def test_mom_reaches_the_step():
    "The scheduled mom is the one the stat uses: grad_avg after one step is (1 - mom) * grad"
    learn = digits_learner(fastopt.Adam)
    learn.create_opt()
    p = next(iter(learn.model.parameters()))
    learn.opt.set_hyper('mom', 0.7)
    for q in learn.model.parameters(): q.grad = torch.ones_like(q)
    learn.opt.step()
    torch.testing.assert_close(learn.opt.state[p]['grad_avg'], torch.full_like(p, 0.3))

def test_discriminative_lrs_reach_each_group():
    rec = RecordHypers()
    learn = digits_learner(fastopt.Lamb, cbs=rec)
    fit(learn, 1, slice(1e-4, 1e-2))
    for body,head in rec.hypers: assert head['lr'] / body['lr'] == pytest.approx(100, rel=1e-6)
    assert len(learn.opt.param_lists) == 2

def test_freeze_leaves_frozen_parameters_bit_identical():
    learn = digits_learner(fastopt.Adam)
    learn.freeze()
    frozen = [p for p in learn.model.parameters() if not p.requires_grad]
    trainable = [p for p in learn.model.parameters() if p.requires_grad]
    assert frozen and trainable
    before = [p.detach().clone() for p in learn.model.parameters()]
    fit(learn, 1, 1e-2)
    after = dict(zip(map(id, learn.model.parameters()), before))
    assert all(torch.equal(p, after[id(p)]) for p in frozen)
    assert all(not torch.equal(p, after[id(p)]) for p in trainable)

@pytest.mark.parametrize('decouple_wd', [True, False], ids=['decoupled', 'l2'])
def test_no_weight_decay_on_bn_and_bias(decouple_wd):
    "wd_bn_bias=False: with zero gradients only weight decay can move a parameter, and it moves only the others"
    learn = digits_learner(lambda ps, **kw: fastopt.Adam(ps, decouple_wd=decouple_wd, **kw), wd_bn_bias=False)
    learn.create_opt()
    learn.opt.set_hypers(lr=0.1, wd=0.1)
    m = learn.model
    bn_bias = {id(p) for p in [*m[0][1].parameters(), *m[1][1].parameters(), *m[2][1].parameters(), m[5].bias]}
    before = {id(p): p.detach().clone() for p in m.parameters()}
    for p in m.parameters(): p.grad = torch.zeros_like(p)
    learn.opt.step()
    for p in m.parameters():
        if id(p) in bn_bias:
            assert torch.equal(p, before[id(p)]), 'a batch-norm or bias parameter was decayed'
        elif decouple_wd:
            torch.testing.assert_close(p, before[id(p)] * (1 - 0.1 * 0.1))
        else:
            assert not torch.equal(p, before[id(p)])

def test_save_and_load_with_optimizer_state(tmp_path):
    learn = digits_learner(fastopt.RAdam, path=tmp_path)
    fit(learn, 1, 1e-2)
    learn.save('ckpt', with_opt=True)
    fresh = digits_learner(fastopt.RAdam, path=tmp_path)
    fresh.load('ckpt', with_opt=True)
    for p,q in zip(learn.model.parameters(), fresh.model.parameters()):
        a,b = learn.opt.state[p],fresh.opt.state[q]
        assert a.keys() == b.keys()
        for k in a: assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k

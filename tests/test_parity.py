"""Four algorithms against independent references: torch.optim, fastai.optimizer and a transcription of the
contract, in float64, over 60 steps with a parameter that misses every third gradient, an all-zero parameter
and a do_wd=False parameter, in both weight-decay modes."""
import math
import pytest
import torch
import fastai.optimizer as fao
import fastopt
from helpers import run_fastai_style, run_torch, assert_params_close, make_params
from reference import reference

H = dict(lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.1)
TORCH = dict(lr=H['lr'], betas=(H['mom'], H['sqr_mom']), eps=H['eps'])
modes = pytest.mark.parametrize('decouple_wd', [True, False], ids=['decoupled', 'l2'])

def test_fixture_moves_every_parameter():
    "A parameter that never moved would make the comparisons below vacuous"
    res, start = run_fastai_style(fastopt.Adam, **H), make_params()
    for k in res: assert not torch.equal(res[k], start[k]), k

@modes
def test_adam(decouple_wd):
    ours = run_fastai_style(fastopt.Adam, decouple_wd=decouple_wd, **H)
    assert_params_close(ours, reference('adam', decouple_wd=decouple_wd, **H))
    assert_params_close(ours, run_fastai_style(fao.Adam, decouple_wd=decouple_wd, **H))
    torch_cls = torch.optim.AdamW if decouple_wd else torch.optim.Adam
    assert_params_close(ours, run_torch(torch_cls, H['wd'], **TORCH))

@modes
def test_amsgrad(decouple_wd):
    ours = run_fastai_style(fastopt.AMSGrad, decouple_wd=decouple_wd, **H)
    assert_params_close(ours, reference('amsgrad', decouple_wd=decouple_wd, **H))
    torch_cls = torch.optim.AdamW if decouple_wd else torch.optim.Adam
    assert_params_close(ours, run_torch(torch_cls, H['wd'], amsgrad=True, **TORCH))

def test_amsgrad_differs_from_adam():
    "The max must actually change the result on this sequence, or the AMSGrad test proves nothing new"
    a, b = run_fastai_style(fastopt.Adam, **H), run_fastai_style(fastopt.AMSGrad, **H)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4

@modes
@pytest.mark.parametrize('beta', [0., 5.])
def test_radam_vs_fastai_and_contract(decouple_wd, beta):
    ours = run_fastai_style(fastopt.RAdam, decouple_wd=decouple_wd, beta=beta, **H)
    assert_params_close(ours, reference('radam', decouple_wd=decouple_wd, beta=beta, **H))
    assert_params_close(ours, run_fastai_style(fao.RAdam, decouple_wd=decouple_wd, beta=beta, **H))

@modes
def test_radam_vs_torch(decouple_wd):
    "torch adds eps to sqrt(v) before the bias correction: with a tiny eps the placement does not matter"
    h = {**H, 'eps': 1e-12}
    ours = run_fastai_style(fastopt.RAdam, decouple_wd=decouple_wd, **h)
    theirs = run_torch(torch.optim.RAdam, h['wd'], lr=h['lr'], betas=(h['mom'], h['sqr_mom']), eps=h['eps'],
                       decoupled_weight_decay=decouple_wd)
    assert_params_close(ours, theirs)

def test_radam_rho_min_4_matches_contract():
    ours = run_fastai_style(fastopt.RAdam, rho_min=4., **H)
    assert_params_close(ours, reference('radam', rho_min=4., **H))
    assert not torch.allclose(ours['matrix'], run_fastai_style(fastopt.RAdam, **H)['matrix'])

@modes
def test_lamb(decouple_wd):
    ours = run_fastai_style(fastopt.Lamb, decouple_wd=decouple_wd, **H)
    assert_params_close(ours, reference('lamb', decouple_wd=decouple_wd, **H))
    assert_params_close(ours, run_fastai_style(fao.Lamb, decouple_wd=decouple_wd, **H))

@pytest.mark.parametrize('trust_clip', [10., None, 0.5])
def test_lamb_paper_form(trust_clip):
    "trust_wd=True: the decay sits inside the trust-scaled update; trust_clip=None removes the cap"
    ours = run_fastai_style(fastopt.Lamb, trust_wd=True, trust_clip=trust_clip, **H)
    assert_params_close(ours, reference('lamb', trust_wd=True, trust_clip=trust_clip, **H))

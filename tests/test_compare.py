"""`fastopt compare` on what users bring: diverging runs, lr_find suggestions that blow up, diagnostics plots, awkward
CSVs, bad --out folders, interrupts and --resume. Tiny runs (one epoch, one or two optimizers) on one thread."""
import contextlib, io, math, os
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_diabetes
import fastopt
import fastopt.benchmark as fb
from fastai.learner import Learner
from fastopt.cli import main
from fastopt.registry import registry
from fastopt.workloads import digits_workload, table_workload

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "These runs are tiny: one thread is faster on a shared machine"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def run_cli(argv):
    "main(argv) -> (exit code, stdout, stderr)"
    out,err = io.StringIO(),io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: main(argv)
        except SystemExit as e: code = e.code
    return code,out.getvalue(),err.getvalue()

def csv_file(tmp_path, df, name='t.csv'):
    p = tmp_path/name
    df.to_csv(p, index=False)
    return str(p)

def compare_csv(tmp_path, csv, target, *extra):
    return run_cli(['compare', '--csv', csv, '--target', target, '--opt', 'Adam', '--epochs', '2', '--seeds', '1', '--lr', '1e-2',
                    '--quiet', '--out', str(tmp_path/'out'), *extra])

def colored_pixels(png) -> int:
    "Pixels of a saved plot that are neither grey nor white: the curves (axes, text and grid are grey)"
    import matplotlib.image
    im = matplotlib.image.imread(png)[..., :3]
    return int(((im.max(-1) - im.min(-1)) > 0.25).sum())

def test_diverging_run_is_recorded_and_the_rest_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(registry, 'Blowup', dict(opt=fastopt.Adam, digits=dict(lr=1e6)))
    code,out,err = run_cli(['compare', '--opt', 'Adam,Blowup', '--epochs', '1', '--seeds', '2', '--quiet', '--out', str(tmp_path)])
    assert code == 0, err
    runs = pd.read_csv(tmp_path/'runs.csv')
    assert set(runs[runs.optimizer == 'Blowup'].status) == {'diverged'}
    assert set(runs[runs.optimizer == 'Adam'].status) == {'ok'}
    for f in ('summary.csv', 'report.md', 'compare-digits.png'): assert (tmp_path/f).stat().st_size > 0
    report = (tmp_path/'report.md').read_text()
    assert 'Blowup' in report and 'diverged' in report
    s = pd.read_csv(tmp_path/'summary.csv').set_index('optimizer')
    assert s.loc['Blowup', 'diverged'] == 2 and s.loc['Adam', 'n'] == 2
    # the interval is the t-interval of the sample std (n - 1), not a population std
    a = runs[runs.optimizer == 'Adam'].metric.to_numpy()
    assert s.loc['Adam', 'std'] == pytest.approx(a.std(ddof=1))
    assert s.loc['Adam', 'ci95'] == pytest.approx(12.7062 * a.std(ddof=1) / math.sqrt(2), rel=1e-4)

@pytest.mark.parametrize('valley', [1e6, float('nan')])
def test_lr_find_suggestion_that_blows_up(tmp_path, monkeypatch, valley):
    monkeypatch.setattr(Learner, 'lr_find', lambda self, **kw: SimpleNamespace(valley=valley))
    code,out,err = run_cli(['compare', '--opt', 'Adam', '--epochs', '1', '--seeds', '1', '--lr', 'auto', '--out', str(tmp_path)])
    assert code == 0, err
    runs = pd.read_csv(tmp_path/'runs.csv')
    assert list(runs.status) == (['diverged'] if valley == 1e6 else ['error'])
    assert 'lr_find suggest' in err and 'Traceback' not in err
    assert (tmp_path/'report.md').exists() and (tmp_path/'summary.csv').exists()

def test_diagnostics_plot_has_curves(tmp_path):
    code,_,err = run_cli(['compare', '--opt', 'Adam', '--epochs', '1', '--seeds', '1', '--diagnostics', '--quiet', '--out', str(tmp_path)])
    assert code == 0, err
    png = tmp_path/'diagnostics-digits-Adam.png'
    assert colored_pixels(png) > 2000, 'the diagnostics plot has no curves'
    assert colored_pixels(tmp_path/'compare-digits.png') > 50   # one epoch: a point per optimizer

def test_empty_plot_has_no_colored_pixels(tmp_path):
    "The pixel check above can fail: an UpdateStats plot without records has no colored pixels"
    from fastopt.diagnostics import UpdateStats
    s = UpdateStats(); s.records = []
    s.plot().savefig(tmp_path/'e.png', dpi=70)
    assert colored_pixels(tmp_path/'e.png') == 0

def test_tiny_csv_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=70)
    df = pd.DataFrame(dict(a=x, b=rng.normal(size=70), y=np.where(x > 0, 'pos', 'neg')))
    code,out,err = compare_csv(tmp_path, csv_file(tmp_path, df), 'y')
    assert code == 0, err
    runs = pd.read_csv(tmp_path/'out'/'runs.csv')
    assert list(runs.status) == ['ok'] and 0.5 < runs.metric[0] <= 1

def test_integer_regression_target(tmp_path):
    df = load_diabetes(as_frame=True).frame
    df['target'] = df.target.astype(int) - 30   # integers, some negative
    code,out,err = compare_csv(tmp_path, csv_file(tmp_path, df), 'target')
    assert code == 0, err
    runs = pd.read_csv(tmp_path/'out'/'runs.csv')
    assert list(runs.status) == ['ok'] and 'rmse' in out

def test_task_override(tmp_path):
    df = pd.DataFrame(dict(a=np.arange(60.) % 7, y=np.arange(60) % 3))
    code,out,err = compare_csv(tmp_path, csv_file(tmp_path, df), 'y', '--task', 'regression')
    assert code == 0, err
    assert 'rmse' in out and 'accuracy' not in out
    code,out,err = compare_csv(tmp_path, csv_file(tmp_path, df), 'y', '--task', 'classification')
    assert code == 0 and 'accuracy' in out

def test_missing_labels_and_a_rare_class(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=120)
    y = pd.Series(np.where(x > 0, 'pos', 'neg'), dtype=object)
    y[[3, 10, 50]] = None
    y[7] = 'rare'
    df = pd.DataFrame(dict(a=x, b=rng.normal(size=120), y=y))
    code,out,err = run_cli(['compare', '--csv', csv_file(tmp_path, df), '--target', 'y', '--opt', 'Adam', '--epochs', '2', '--seeds', '1',
                            '--lr', '1e-2', '--out', str(tmp_path/'out')])
    assert code == 0, err
    assert 'dropped 3 of 120 rows' in err
    runs = pd.read_csv(tmp_path/'out'/'runs.csv')
    assert list(runs.status) == ['ok'] and runs.metric[0] > 0.5

@pytest.mark.parametrize('content,message', [('', 'CSV file is empty'), ('a,y\n', 'has a header but no rows'),
                                             ('a,y\n1,2\n2,3\n', 'Too few rows with a target: 2')])
def test_unusable_csv_is_one_line(tmp_path, content, message):
    p = tmp_path/'t.csv'
    p.write_text(content)
    code,out,err = compare_csv(tmp_path, str(p), 'y')
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path/'out'/'runs.csv').exists()

def test_regression_beats_the_mean():
    df = load_diabetes(as_frame=True).frame
    w = table_workload(df, 'target', task='regression', epochs=4, log=lambda *a: None)
    r = fb.run_one(w, 'Adam', 1e-2)
    assert r['status'] == 'ok'
    assert r['metric'] < 0.85 * w.baseline, (r['metric'], w.baseline)

def test_bad_out_is_refused_before_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fb, 'run_one', lambda *a, **k: calls.append(a))
    f = tmp_path/'file'
    f.write_text('x')
    for out in (f, f/'sub'):
        code,_,err = run_cli(['compare', '--opt', 'Adam', '--out', str(out)])
        assert code == 2 and ('Output folder' in err or 'Cannot write' in err), err
    if os.geteuid() != 0:   # root can write into a read-only folder
        ro = tmp_path/'ro'; ro.mkdir(); ro.chmod(0o500)
        code,_,err = run_cli(['compare', '--opt', 'Adam', '--out', str(ro)])
        assert code == 2 and 'Cannot write' in err
    assert calls == []

@pytest.mark.parametrize('opt,message', [('', "No optimizer given in ''"), ('real', "Unknown optimizer: 'real'"), (' , ', 'No optimizer given')])
def test_bench_refuses_bad_opt(opt, message, tmp_path):
    code,_,err = run_cli(['bench', '--opt', opt, '--out', str(tmp_path)])
    assert code == 2 and message in err and 'Traceback' not in err

def test_interrupt_keeps_runs_and_resume_continues(tmp_path, monkeypatch):
    real_run = fb.run_one
    calls = []
    def interrupting(*a, **k):
        calls.append((a[1], a[3]))
        if len(calls) == 3: raise KeyboardInterrupt
        return real_run(*a, **k)
    monkeypatch.setattr(fb, 'run_one', interrupting)
    w = digits_workload(epochs=1)
    res = fb.benchmark([w], ['Adam', 'UM'], seeds=2, out=tmp_path, progress=False)
    assert res.interrupted and len(pd.read_csv(tmp_path/'runs.csv')) == 2
    assert (tmp_path/'report.md').exists()
    calls.clear()
    monkeypatch.setattr(fb, 'run_one', lambda *a, **k: (calls.append((a[1], a[3])), real_run(*a, **k))[1])
    res = fb.benchmark([w], ['Adam', 'UM'], seeds=2, out=tmp_path, progress=False, resume=True)
    assert calls == [('UM', 0), ('UM', 1)]
    runs = pd.read_csv(tmp_path/'runs.csv')
    assert len(runs) == 4 and set(runs.status) == {'ok'}
    assert list(res.summary.n) == [2, 2]

def test_update_stats_plot_survives_validate(tmp_path):
    "Learner.validate() fires before_fit; UpdateStats used to clear its records there, leaving the plot empty"
    from fastopt.diagnostics import UpdateStats
    from fastopt.digits import digits_learner
    stats = UpdateStats()
    learn = digits_learner(fastopt.Adam, cbs=stats)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    with learn.no_bar(): learn.validate()
    stats.plot().savefig(tmp_path/'d.png', dpi=70)
    assert colored_pixels(tmp_path/'d.png') > 2000

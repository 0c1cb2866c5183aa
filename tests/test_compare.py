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
    code,out,err = run_cli(['compare', '--workload', 'digits', '--opt', 'Adam,Blowup', '--epochs', '1', '--seeds', '2', '--quiet', '--out', str(tmp_path)])
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
    code,out,err = run_cli(['compare', '--workload', 'digits', '--opt', 'Adam', '--epochs', '1', '--seeds', '1', '--lr', 'auto', '--out', str(tmp_path)])
    assert code == 0, err
    runs = pd.read_csv(tmp_path/'runs.csv')
    assert list(runs.status) == (['diverged'] if valley == 1e6 else ['error'])
    assert 'lr_find suggest' in err and 'Traceback' not in err
    assert (tmp_path/'report.md').exists() and (tmp_path/'summary.csv').exists()

def test_diagnostics_plot_has_curves(tmp_path):
    code,_,err = run_cli(['compare', '--workload', 'digits', '--opt', 'Adam', '--epochs', '1', '--seeds', '1', '--diagnostics', '--quiet', '--out', str(tmp_path)])
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

# ---------------------------------------------------------------- your own optimizer: module:builder

MY_OPTS = '''
import fastopt
def SlowAdam(params, lr=3e-3, fused=False): return fastopt.Adam(params, lr=lr, fused=fused)
def NoDefaultLr(params, lr, fused=False): return fastopt.Adam(params, lr=lr, fused=fused)
def Broken(params, lr=1e-2, fused=False): return fastopt.Adam(params, lr=lr, sqr_mom=2., fused=fused)
def NotAnOptimizer(params, lr=1e-2): return 'not an optimizer'
def NoLr(params, momentum=0.9): return None
def EagerSGD(params, lr=1e-2): return fastopt.SGD(params, lr=lr, fused=False)
settings = 3
'''

@pytest.fixture
def my_opts(tmp_path, monkeypatch):
    "A module of builders in the working directory, under a name no other test uses"
    import uuid
    name = f'my_opts_{uuid.uuid4().hex[:8]}'
    (tmp_path/f'{name}.py').write_text(MY_OPTS)
    monkeypatch.chdir(tmp_path)
    return name

def no_training(monkeypatch):
    calls = []
    monkeypatch.setattr(fb, 'run_one', lambda *a, **k: calls.append(a))
    return calls

@pytest.mark.parametrize('builder,message', [
    ('nosuchmodule_xyz:Adam', "no module 'nosuchmodule_xyz'"),
    ('{m}:Missing', "module '{m}' ("),
    ('{m}:settings', "is a int, not an optimizer builder"),
    ('{m}:NoLr', "takes no lr (params, momentum)"),
    ('{m}:NotAnOptimizer', "built a str, which has no step()"),
    ('{m}:Broken', "Invalid sqr_mom: 2.0"),
    ('{m}:NoDefaultLr', "has no usable lr for workload 'digits' (None): give its builder a default lr, or pass --lr"),
    ('{m}', "Unknown optimizer: '{m}'"),
])
def test_module_builder_errors_before_training(my_opts, monkeypatch, tmp_path, builder, message):
    calls = no_training(monkeypatch)
    with pytest.raises(ValueError) as e:
        fb.benchmark([digits_workload(epochs=1)], ['Adam', builder.format(m=my_opts)], seeds=1, out=tmp_path/'out', progress=False)
    assert message.format(m=my_opts) in str(e.value), str(e.value)
    assert calls == []

def test_missing_hypers_for_one_workload_fails_before_any_run(monkeypatch, tmp_path):
    monkeypatch.setitem(registry, 'DigitsOnly', dict(opt=fastopt.Adam, digits=dict(lr=1e-2)))
    calls = no_training(monkeypatch)
    with pytest.raises(ValueError, match="DigitsOnly has no hypers for workload 'tabular'"):
        fb.benchmark(['digits', 'tabular'], ['Adam', 'DigitsOnly'], seeds=1, out=tmp_path, progress=False)
    assert calls == []

def test_module_builder_runs_from_its_default_lr_and_the_report_says_where_it_came_from(my_opts, tmp_path):
    res = fb.benchmark([digits_workload(epochs=1)], [f'{my_opts}:SlowAdam', 'fastai.Adam'], seeds=2, out=tmp_path/'out', progress=False)
    runs = res.runs
    assert set(runs.status) == {'ok'} and set(runs[runs.optimizer == f'{my_opts}:SlowAdam'].lr) == {3e-3}
    report = (tmp_path/'out'/'report.md').read_text()
    assert f"- {my_opts}:SlowAdam: {my_opts}.SlowAdam ({tmp_path/my_opts}.py), default lr 0.003" in report
    assert f'| {my_opts}:SlowAdam |' in report and 'vs fastai.Adam: held-out loss' in report

def test_sweep_centres_on_the_builders_default_lr(my_opts, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(fb, 'run_one', lambda w, name, lr, seed, *a, **k: (seen.append(lr), dict(workload=w.name, optimizer=name, phase='sweep', lr=lr, seed=seed,
                                                                                     status='diverged', metric=math.nan, note='stopped'))[1])
    fb.benchmark([digits_workload(epochs=1)], [f'{my_opts}:SlowAdam'], seeds=1, sweep=True, grid=3, out=tmp_path/'out', progress=False)
    assert seen == fb.lr_grid(3e-3, 3)

# ---------------------------------------------------------------- the statistics

def test_paired_test_and_holm_resolve_a_known_effect():
    "Seed noise shared by every optimizer (sd 1) hides a 0.3 effect from unpaired intervals; the paired test finds it, Holm keeps the null ones"
    rng = np.random.default_rng(3)
    seeds = range(5)
    shared = rng.normal(0, 1., 5)
    base = {s: shared[s] + rng.normal(0, 0.02) for s in seeds}
    effects = [0.3, -0.3] + [0.] * 18
    opts = [{s: shared[s] + d + rng.normal(0, 0.02) for s in seeds} for d in effects]
    m,_,ci,_ = fb.mean_ci(list(opts[0].values()))
    mb,_,cib,_ = fb.mean_ci(list(base.values()))
    assert abs(m - mb) < ci + cib   # unpaired 95% intervals overlap
    p = [fb.paired_test(o, base)['p'] for o in opts]
    adj = fb.holm(p)
    assert list(adj < 0.05) == [True, True] + [False] * 18
    assert np.all(adj >= np.array(p)) and adj[np.argmin(p)] == pytest.approx(min(p) * 20)

def test_holm_against_a_hand_computed_example():
    np.testing.assert_allclose(fb.holm([0.01, 0.02, 0.03, 0.5]), [0.04, 0.06, 0.06, 0.5])

def test_intervals_respect_the_metric_range_and_say_when_seeds_tie():
    assert fb.fmt_metric(0.9944, 0.0069, 3, '%', (0., 1.)) == '99.44% (CI 98.75–100.00, n=3)'
    assert fb.fmt_metric(0.9944, 0.0069, 3, '%') == '99.44% ± 0.69 (n=3)'   # without bounds, as before
    assert fb.fmt_metric(0.99, 0., 3, '%', (0., 1.), std=0.) == '99.00% (n=3, every seed the same)'
    assert 'fewer than 3 seeds' in fb.fmt_metric(0.9, 0.01, 2, '%', (0., 1.))
    assert fb.clip_interval(0.02, 0.05, (0., math.inf)) == (0., pytest.approx(0.07))

def fake_run(w, name, lr, seed, epochs=None, fused=False, phase='final', **k):
    "A run that trains nothing: the metric is a function of the optimizer and seed"
    v = 0.9 + 0.01 * seed + (0.05 if 'Slow' in name else 0.)
    return dict(workload=w.name, optimizer=name, phase=phase, lr=lr, seed=seed, epochs=epochs or w.epochs, fused=fused, status='ok',
                metric=v, valid_loss=1 - v, time_to_target=math.nan, seconds=0.1, curve=f'{v}', loss_curve=f'{1 - v}', times='0.1', note='')

def test_cli_runs_a_module_builder_and_the_report_reproduces_the_command(my_opts, tmp_path, monkeypatch):
    monkeypatch.setattr(fb, 'run_one', fake_run)
    code,out,err = run_cli(['compare', '--opt', f'{my_opts}:SlowAdam,Adam', '--workload', 'digits,tabular', '--baseline', 'Adam', '--quiet', '--out', 'out'])
    assert code == 0, err
    report = (tmp_path/'out'/'report.md').read_text()
    assert f"`fastopt compare --opt {my_opts}:SlowAdam,Adam --workload digits,tabular --baseline Adam --quiet --out out` run in `{tmp_path}`" in report
    assert report.count('| **better** +5.00 pts') == 1   # digits accuracy: 0.05 on every seed; tabular's rmse is lower-is-better: worse
    assert 'against Adam (paired over seeds, Holm-adjusted p < 0.05): 2 better, 0 worse' in out

@pytest.mark.parametrize('cmd', ['compare', 'bench'])
def test_cli_refuses_a_bad_module_builder_in_one_line(my_opts, tmp_path, monkeypatch, cmd):
    calls = no_training(monkeypatch)
    for spec,message in ((f'{my_opts}:Missing', f"module '{my_opts}' ("), (f'{my_opts}:settings', 'not an optimizer builder'), ('nomod_q:X', "no module 'nomod_q'")):
        code,_,err = run_cli([cmd, '--opt', spec, '--out', str(tmp_path/'out')])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert calls == []

def test_bench_times_a_module_builder(my_opts):
    "A builder without `fused` is timed eagerly; its fused column is empty"
    from fastopt.bench import bench
    res = bench([f'{my_opts}:EagerSGD'], sets=[], shapes={'tiny': [(8, 4), (4,)]}, steps=2, eager_steps=2)
    r = res.iloc[0]
    assert r.optimizer == f'{my_opts}:EagerSGD' and math.isnan(r.fused_ms) and r.eager_ms > 0 and math.isnan(r.fastai_ms)

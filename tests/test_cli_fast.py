"The command line answers at once: `--version`, `--help` and mistakes in the arguments are handled before torch or fastai is imported (timings live in the measurements, not here)."
import json, subprocess, sys
import pytest

_run = """
import json, sys
from fastopt.cli import main
try: main(sys.argv[1:]); code = 0
except SystemExit as e: code = e.code
print(json.dumps(dict(code=code, loaded=sorted(m for m in ('torch', 'fastai', 'numpy', 'pandas', 'matplotlib') if m in sys.modules))))
"""

def cli(*args) -> tuple:
    "Run `fastopt ARGS` in a fresh interpreter: its exit status, stdout (without the report line), stderr, and which heavy modules it imported"
    p = subprocess.run([sys.executable, '-c', _run, *args], capture_output=True, text=True)
    *out, last = p.stdout.rstrip('\n').split('\n')
    res = json.loads(last)
    return res['code'], '\n'.join(out), p.stderr, res['loaded']

@pytest.mark.parametrize('args', [['--version'], ['--help'], *([c, '--help'] for c in ('compare', 'bench', 'regret', 'rectifier', 'trajectories'))])
def test_version_and_help_import_nothing_heavy(args):
    code, out, err, loaded = cli(*args)
    assert code == 0 and loaded == [], (args, code, loaded, err)
    assert out.startswith('fastopt 0.') if args == ['--version'] else 'usage: fastopt' in out

def test_mistakes_are_refused_before_torch(tmp_path):
    afile = tmp_path/'results'
    afile.write_text('x')
    cases = [
        (['compare', '--opt', 'Adamw'], "fastopt compare: error: Unknown optimizer: 'Adamw' (known: Adam, AMSGrad, "),
        (['compare', '--opt', ''], "fastopt compare: error: No optimizer given in ''"),
        (['compare', '--opt', 'Adam,Adam'], "fastopt compare: error: An optimizer is named twice: Adam, Adam"),
        (['compare', '--workload', 'imagenet'], "fastopt compare: error: Unknown workload: 'imagenet' (known: digits, text, tabular)"),
        (['compare', '--out', str(afile)], f"fastopt compare: error: Output folder {str(afile)!r} is a file"),
        (['compare', '--epochs', 'x'], "argument --epochs: invalid int value: 'x'"),
        (['compare', '--epochs', '0'], "fastopt compare: error: Invalid epochs: 0 (expected a positive integer)"),
        (['compare', '--lr', 'fast'], "fastopt compare: error: Invalid lr: 'fast' (expected a positive number or 'auto')"),
        (['compare', '--lr', '-0.1'], "fastopt compare: error: Invalid lr: '-0.1' (expected a positive number or 'auto')"),
        (['compare', '--lr', 'auto', '--sweep'], "fastopt compare: error: Give either --lr auto or --sweep, not both"),
        (['compare', '--csv', 'x.csv'], "fastopt compare: error: Give both --csv and --target, or neither"),
        (['bench', '--opt', 'Lion'], "fastopt bench: error: Unknown optimizer: 'Lion' (known: Adam, "),
        (['bench', '--sets', 'resnet50'], "fastopt bench: error: Unknown parameter set: 'resnet50' (known: resnet18, transformer, many)"),
        (['bench', '--what', 'speed'], "fastopt bench: error: Unknown --what: 'speed' (known: step, compile, e2e, peers, memory, precision)"),
        (['bench', '--steps', '0'], "fastopt bench: error: Invalid steps: 0 (expected a positive integer)"),
        (['bench', '--out', str(afile)], f"fastopt bench: error: Output folder {str(afile)!r} is a file"),
        (['regret', '--steps', '0'], "fastopt regret: error: Invalid steps: 0 (expected a positive integer)"),
        (['regret', '--out', str(afile)], f"fastopt regret: error: Output folder {str(afile)!r} is a file"),
        (['rectifier', '--sqr-mom', '1'], "fastopt rectifier: error: Invalid sqr_mom: 1.0 (expected 0 < sqr_mom < 1)"),
        (['trajectories', '--fn', 'sphere'], "argument --fn: invalid choice: 'sphere'"),
        (['trajectories', '--out', str(afile)], f"fastopt trajectories: error: Output folder {str(afile)!r} is a file"),
    ]
    for args, msg in cases:
        code, out, err, loaded = cli(*args)
        lines = err.strip().splitlines()
        assert code == 2 and msg in lines[-1], (args, code, err)
        assert len(lines) == 1 or not msg.startswith('fastopt '), ('one line', args, err)   # argparse's own errors come after its usage
        assert loaded == [], (args, loaded)

def test_the_console_script_imports_nothing_heavy():
    "`python -m fastopt --version` (the package, `__main__` and the CLI) as `-X importtime` reports it"
    p = subprocess.run([sys.executable, '-X', 'importtime', '-m', 'fastopt', '--version'], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith('fastopt '), p.stderr[-2000:]
    imported = {l.split('|')[-1].strip() for l in p.stderr.splitlines() if l.startswith('import time:')}
    assert 'fastopt.cli' in imported, 'the report names what was imported'
    assert not {m.split('.')[0] for m in imported} & {'torch', 'fastai', 'numpy', 'pandas'}, sorted(imported)

def test_the_names_known_before_torch_are_the_real_ones():
    "The CLI's plain tuples cannot drift from what they stand for"
    from fastopt import cli
    from fastopt.registry import registry
    from fastopt.workloads import workloads
    from fastopt.bench import bench_optimizers, param_sets
    assert cli.optimizer_names == tuple(registry)
    assert cli.workload_names == tuple(workloads)
    assert cli.bench_optimizer_names == tuple(bench_optimizers)
    assert cli.param_set_names == tuple(param_sets)

def test_an_optimizer_registered_before_main_is_accepted():
    "A user's module that adds to `fastopt.registry.registry` before calling `main` (nbs/11_writing.ipynb) gets its name through the check"
    from fastopt.cli import check_optimizers
    from fastopt.registry import registry
    with pytest.raises(ValueError, match="Unknown optimizer: 'Mine'"): check_optimizers(['Mine'])
    registry['Mine'] = dict(registry['Adam'])
    try: assert check_optimizers(['Adam', 'Mine']) == ['Adam', 'Mine']
    finally: del registry['Mine']

def test_the_package_loads_its_names_on_first_use():
    "`import fastopt` is cheap; the first name used imports the optimizers, documented before anyone sees them, whichever way they are reached"
    code = """
import sys, pydoc, fastopt
cheap = 'torch' not in sys.modules and 'fastai' not in sys.modules
text = pydoc.render_doc(fastopt.Adam, renderer=pydoc.plaintext)
from fastopt.core import adam_denom
ns = {}
exec('from fastopt import *', ns)
print(cheap, 'Parameters:' in text, 'Parameters:' in adam_denom.__doc__, sorted(set(ns) - {'__builtins__'}) == sorted(fastopt.__all__), 'Optimizer' in dir(fastopt))
"""
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ['True'] * 5, out
    direct = "from fastopt.rectified import SRAdam; print('Parameters:' in SRAdam.__doc__)"
    assert subprocess.run([sys.executable, '-c', direct], capture_output=True, text=True, check=True).stdout.strip() == 'True', 'a module imported directly is documented too'
    with pytest.raises(AttributeError, match="no attribute 'Adamw'"):
        import fastopt; fastopt.Adamw

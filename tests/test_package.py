"The package as a new user meets it: `from fastopt import *`, `help()`, `--version`, `python -m fastopt`, module docstrings."
import importlib, pkgutil, pydoc, types
import pytest
import fastai.optimizer
import fastopt
from fastopt.cli import main

def test_star_import_is_deliberate():
    "The optimizers and what they are used with: no submodules, and no `Optimizer` shadowing fastai's"
    ns = {}
    exec('from fastopt import *', ns)
    names = set(ns) - {'__builtins__'}
    assert names == set(fastopt.__all__) and len(names) == 27
    assert not any(isinstance(v, types.ModuleType) for v in ns.values())
    assert 'Optimizer' not in names and issubclass(fastopt.Optimizer, fastai.optimizer.Optimizer)   # still there as fastopt.Optimizer
    assert {'Adam', 'Lamb', 'Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon', 'ScheduleFreeCallback'} <= names

@pytest.mark.parametrize('name', ['Lamb', 'Muon', 'ScheduleFreeAdamW', 'Adam'])
def test_help_shows_the_parameter_docs(name):
    text = pydoc.render_doc(getattr(fastopt, name), renderer=pydoc.plaintext)
    assert 'Parameters:' in text
    if name == 'Lamb': assert 'trust_clip (default: 10.0): Cap on the trust ratio' in text

def test_version(capsys):
    with pytest.raises(SystemExit) as e: main(['--version'])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f'fastopt {fastopt.__version__}'

def test_python_dash_m_runs_the_cli():
    spec = importlib.util.find_spec('fastopt.__main__')
    assert spec is not None and 'from .cli import main' in spec.loader.get_source('fastopt.__main__')

def test_docstrings_link_only_what_exists():
    "No module points at the documentation site that was never published"
    for m in pkgutil.iter_modules(fastopt.__path__):
        if m.name.startswith('_'): continue
        doc = importlib.import_module(f'fastopt.{m.name}').__doc__ or ''
        assert 'github.io' not in doc, m.name

def test_optimizers_load_neither_compiler_nor_dtensor():
    "The optimizers (`fastopt.Adam` imports them all) import neither dynamo nor inductor nor DTensor (about 3.5 s and 0.9 s of every process, eager users and DDP ranks included); a fused step's first compile or FSDP2 does"
    import subprocess, sys
    code = "import sys, fastopt; fastopt.Adam; print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'torch.distributed.tensor') if m in sys.modules))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == '[]', f"import fastopt loaded {out}"

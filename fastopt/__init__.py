"""fastopt: optimizers for fastai, written as fastai stats and steppers and checked against independent references.

`from fastopt import *` brings the optimizers (the builders a `Learner` takes as `opt_func`) and the few helpers they
are used with; everything else (stats, steppers, `fastopt.core.Optimizer`, which subclasses fastai's and is deliberately
not exported so that it does not shadow `fastai.optimizer.Optimizer`) is reached through its module. The conformance
kit is `fastopt.testing`. Source and documentation: the notebooks in `nbs/` of https://github.com/fastopt/fastopt."""
__version__ = "0.0.1"

import sys
from importlib.machinery import PathFinder, SourceFileLoader

__all__ = [
    # optimizers
    'Adam', 'AMSGrad', 'RAdam', 'Lamb', 'SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'AdamAWD', 'UM', 'PreLamb',
    'DuvAdam', 'SUAdam', 'BAdam', 'SGD', 'RMSProp', 'QHAdam', 'Larc', 'Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon',
    # what they are used with
    'feeds_batchnorm', 'is_conv_weight', 'hidden_matrices', 'is_matrix', 'ScheduleFreeCallback',
]

# `import fastopt` imports neither torch nor fastai, so that the command line (`fastopt.cli`, whose package this is)
# answers `--version`, `--help` and a mistyped argument at once. The optimizer modules' public names become fastopt's
# on the first use of one of them (`fastopt.Adam`, `from fastopt import *`, `dir(fastopt)`): PEP 562's module `__getattr__`.
_star_modules = ('core', 'adam', 'rectified', 'layerwise', 'centralization', 'scale_invariant', 'ratio', 'fastai_optimizers', 'modern')
_loading = False

def _load():
    "Import the optimizer modules and give `fastopt` their public names, as `from .core import *`, `from .adam import *`... in that order"
    global _loading
    import importlib
    _loading = True
    try:
        for m in _star_modules:
            mod = importlib.import_module(f'{__name__}.{m}')
            globals().update((k, getattr(mod, k)) for k in mod.__all__)
    finally: _loading = False
    globals()['_loaded'] = True

def __getattr__(name:str):
    "A public name of the optimizer modules (`fastopt.Adam`), which are imported on the first such use"
    if name.startswith('__') or _loading or '_loaded' in globals(): raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load()
    try: return globals()[name]
    except KeyError: raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

def __dir__():
    if not _loading: _load()
    return sorted(globals())

# Every public function of every fastopt module gets its parameter documentation in `__doc__` (see
# `fastopt.core.add_param_docs`) as soon as the module and `fastopt.core`, which writes it, are both imported: before any
# user code can see the function, whichever way it was imported (`fastopt.Adam`, `from fastopt.core import adam_stats`).
_imported,_documented = set(),set()

def _document_imported():
    "Document the public functions of every fastopt module that has finished importing, once `fastopt.core` has"
    add = getattr(sys.modules.get(f'{__name__}.core'), 'add_param_docs', None)
    if add is None or f'{__name__}.core' not in _imported: return
    import inspect
    for name in sorted(_imported - _documented):
        mod = sys.modules.get(name)
        for k in getattr(mod, '__all__', []):
            f = getattr(mod, k, None)
            if inspect.isfunction(f) and f.__module__ == name: add(f)
        _documented.add(name)

class _DocumentingLoader(SourceFileLoader):
    "Python's loader for a fastopt module, which documents the module's functions once it has run"
    def exec_module(self, module):
        super().exec_module(module)
        _imported.add(module.__name__)
        _document_imported()

class _DocumentingFinder:
    "Finds fastopt's modules as Python does, with a loader that documents them"
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if not name.startswith(f'{__name__}.') or path is None: return None
        spec = PathFinder.find_spec(name, path, target)
        if spec is not None and type(spec.loader) is SourceFileLoader: spec.loader = _DocumentingLoader(spec.loader.name, spec.loader.path)
        return spec

if not any(getattr(f, '__qualname__', None) == '_DocumentingFinder' for f in sys.meta_path): sys.meta_path.insert(0, _DocumentingFinder)

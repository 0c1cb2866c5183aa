"""fastopt: optimizers for fastai, written as fastai stats and steppers and checked against independent references.

`from fastopt import *` brings the optimizers (the builders a `Learner` takes as `opt_func`) and the few helpers they
are used with; everything else (stats, steppers, `fastopt.core.Optimizer`, which subclasses fastai's and is deliberately
not exported so that it does not shadow `fastai.optimizer.Optimizer`) is reached through its module. The conformance
kit is `fastopt.testing`. Source and documentation: the notebooks in `nbs/` of https://github.com/fastopt/fastopt."""
__version__ = "0.0.1"

from .core import *
from .adam import *
from .rectified import *
from .layerwise import *
from .centralization import *
from .scale_invariant import *
from .ratio import *
from .fastai_optimizers import *
from .modern import *
from .release import GradientRelease, release_gradients
from .core import add_param_docs as _add_param_docs

__all__ = [
    # optimizers
    'Adam', 'AMSGrad', 'RAdam', 'Lamb', 'SAdam', 'SRAdam', 'AdamGC', 'StableAdam', 'AdamAWD', 'UM', 'PreLamb',
    'DuvAdam', 'SUAdam', 'BAdam', 'SGD', 'RMSProp', 'QHAdam', 'Larc', 'Lion', 'ADOPT', 'ScheduleFreeAdamW', 'Muon',
    # what they are used with
    'feeds_batchnorm', 'is_conv_weight', 'hidden_matrices', 'is_matrix', 'ScheduleFreeCallback', 'GradientRelease', 'release_gradients',
]

def _document_all():
    "Every public function of every fastopt module gets its parameter documentation in `__doc__` (see `add_param_docs`)"
    import inspect, sys
    for name,mod in list(sys.modules.items()):
        if not name.startswith('fastopt.') or mod is None: continue
        for k in getattr(mod, '__all__', []):
            f = getattr(mod, k, None)
            if inspect.isfunction(f) and f.__module__ == name: _add_param_docs(f)
_document_all()

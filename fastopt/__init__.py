__version__ = "0.0.1"

from .core import *
from .adam import *
from .rectified import *
from .layerwise import *
from .centralization import *
from .scale_invariant import *
from .ratio import *
from .fastai_optimizers import *

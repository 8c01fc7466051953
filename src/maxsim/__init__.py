"""maxsim: exact, fast, memory-bounded late-interaction (MaxSim) scoring."""

from .api import maxsim, maxsim_varlen
from .index import Index
from .losses import contrastive_loss
from .search import topk

__version__ = "0.1.0"

__all__ = ["maxsim", "maxsim_varlen", "topk", "Index", "contrastive_loss", "__version__"]

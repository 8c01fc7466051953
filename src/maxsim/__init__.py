"""maxsim: exact, fast, memory-bounded late-interaction (MaxSim) scoring."""

from .api import maxsim, maxsim_varlen

__version__ = "0.1.0"

__all__ = ["maxsim", "maxsim_varlen", "__version__"]

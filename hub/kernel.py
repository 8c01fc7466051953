"""The ``maxsim`` kernel for Hugging Face ``kernels``: the seed-compatible names of the maxsim package.

Every build variant's ``__init__.py`` is this file: it re-exports :mod:`maxsim.compat` (the names,
arguments and conventions of the kernels-hub ``maxsim``) from the installed ``maxsim`` package, so the
package stays the single source of the code. The backend (Triton on CUDA/ROCm, exact torch elsewhere) is
chosen per call from the tensors' device, as in the package.
"""

try:
    from maxsim.compat import *  # noqa: F403
    from maxsim.compat import __all__  # noqa: F401
except ModuleNotFoundError as e:
    if e.name not in ("maxsim", "maxsim.compat"):
        raise
    raise ModuleNotFoundError(
        "the maxsim kernel re-exports the maxsim package, which is not installed: pip install maxsim",
        name=e.name,
    ) from e

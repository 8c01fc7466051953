"""Kernel launches with the compiled kernel remembered per argument signature.

``kernel[grid](*args)`` binds and specializes every argument in Python on each call and builds a cache key
from them: with the ~30 runtime arguments of the strided kernels that is most of the host time of a small
call. ``Launcher`` keys the compiled kernel by a finer signature than Triton's specialization (the exact
int arguments, each tensor's dtype and 16-byte alignment, the constexprs, launch options and device), so
two calls with one key always get the same compiled kernel, and launches it through the compiled
kernel's own launcher. The first call of a key, every call in the Triton interpreter, and calls while a
Triton launch hook is set (profilers such as proton) take Triton's own path.
"""

from __future__ import annotations

import torch
import triton

MAX_KEYS = 1024  # distinct signatures remembered per kernel (one per shape in practice)


def launch_hooks_set() -> bool:
    """True when a profiler hooks Triton launches (a ``HookChain`` from Triton 3.5, a callable before)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return True  # a Triton without knobs: always its own path
    hook = knobs.runtime.launch_enter_hook
    return bool(hook.calls) if hasattr(hook, "calls") else hook is not None


class Launcher:
    """Launch one ``@triton.jit`` kernel whose parameters are its tensors, then its ints, then constexprs.

    Args:
        kernel: the jitted function.
        interpreted: the kernels run in the Triton interpreter (always Triton's own path).
    """

    def __init__(self, kernel, interpreted: bool):
        self.kernel = kernel
        self.interpreted = interpreted
        self.compiled: dict = {}

    @staticmethod
    def _key(
        device: int, tensors: tuple, ints: tuple, values: tuple, num_warps: int, num_stages: int, maxnreg: int | None
    ) -> tuple:
        return (
            device, values, num_warps, num_stages, maxnreg, ints,
            *[(t.dtype, (t.data_ptr() & 15) == 0) for t in tensors],
        )  # fmt: skip

    def compiled_for(
        self, tensors: tuple, ints: tuple, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None
    ):
        """The compiled kernel a launch with these arguments on the current device takes, once one such
        launch ran (None before, and always in the interpreter): for callers that launch it themselves."""
        if self.interpreted:
            return None
        key = self._key(
            torch.cuda.current_device(), tensors, ints, tuple(constexprs.values()), num_warps, num_stages, maxnreg
        )
        return self.compiled.get(key)

    def __call__(
        self,
        grid: int | tuple,
        tensors: tuple,
        ints: tuple,
        constexprs: dict,
        num_warps: int,
        num_stages: int,
        maxnreg: int | None = None,
    ) -> None:
        """Run the kernel on the current device and stream.

        Args:
            grid: the number of programs, or a grid of up to three dims.
            tensors: the tensor arguments in parameter order; ints: the int arguments (Python ints).
            constexprs: every constexpr parameter by name, in parameter order.
            maxnreg: registers per thread at most (NVIDIA only; None: the compiler's choice).
        """
        grid = (grid, 1, 1) if isinstance(grid, int) else (*grid, 1, 1)[:3]
        options = {"num_warps": num_warps, "num_stages": num_stages}
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        if self.interpreted:
            self.kernel[grid](*tensors, *ints, **constexprs, **options)
            return
        values = tuple(constexprs.values())
        device = torch.cuda.current_device()
        key = self._key(device, tensors, ints, values, num_warps, num_stages, maxnreg)
        compiled = self.compiled.get(key)
        if compiled is None or launch_hooks_set():
            compiled = self.kernel[grid](*tensors, *ints, **constexprs, **options)
            if len(self.compiled) >= MAX_KEYS:
                self.compiled.clear()
            self.compiled[key] = compiled
            return
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled.run(
            *grid, stream, compiled.function, compiled.packed_metadata, None, None, None,
            *tensors, *ints, *values,
        )  # fmt: skip

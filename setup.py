"""Build of the optional AVX2 CPU kernel; everything else is in pyproject.toml.

The kernel is built on x86-64 Linux only (with OpenMP: at run time it shares torch's own libgomp), and is
optional: without a C compiler the package still installs and the CPU falls back to the torch backend's
matrix products.
"""

import platform
import sys

from setuptools import Extension, setup

extensions = []
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "maxsim.backends._cpu_kernel",
            sources=["src/maxsim/backends/cpu_kernel.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    )

setup(ext_modules=extensions)

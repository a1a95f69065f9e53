"""Builds the codec's compiled loops (horovod_tnq/core/native.c) next to the package; everything
else about the package is in pyproject.toml. The C file is plain C99 loaded with ctypes
(horovod_tnq/core/native.py), so the build needs only a C compiler; without one the package
still works on its numpy reference.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """A missing compiler leaves the numpy path, with a warning, instead of a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure falls back to numpy
            self.warn(f"horovod_tnq: native codec not built ({error}); using the numpy path")


setup(
    ext_modules=[Extension(
        "horovod_tnq.core._native", ["horovod_tnq/core/native.c"],
        # -ffp-contract=off: no a*b+c fused into an FMA, so results match the numpy reference
        # bit for bit; -fno-fast-math likewise keeps IEEE semantics.
        extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-fast-math"],
        define_macros=[("TNQ_PYTHON_MODULE", "1")],
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)

"""Builds the C++ core (csrc/) as optional pybind11 extensions.

Each folder csrc/<name>/ holding a bindings.cpp becomes the extension module fuyou._<name>; the
core sources beside it take raw pointers and sizes and never see Python (no libtorch link, so the
build needs no torch and works under build isolation). A failed build is not fatal: fuyou falls
back to its pure-Python paths and says so once at run time.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pragma: no cover - pybind11 is a build requirement in pyproject.toml
    Pybind11Extension = None

HERE = os.path.dirname(os.path.abspath(__file__))


def _have_liburing() -> bool:
    """liburing-dev present (header + library): then the I/O engine gets its io_uring path."""
    header = any(os.path.exists(os.path.join(d, "liburing.h")) for d in ("/usr/include", "/usr/local/include"))
    # The shared library, or a static liburing.a (PIC) installed by hand under /usr/local/lib.
    libs = glob.glob("/usr/lib/*/liburing.so") + glob.glob("/usr/lib/liburing.so") + glob.glob("/usr/local/lib/liburing.[as]*")
    return header and bool(libs)


# Per-extension build settings. Keys: extra compile/link args, libraries, macros.
EXT_SETTINGS = {
    "io": lambda: dict(
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],
        libraries=["uring"] if _have_liburing() else [],
        define_macros=[("FUYOU_HAVE_URING", "1")] if _have_liburing() else [],
    ),
    # AVX2/FMA code paths use function target attributes and are dispatched at run time, so the
    # module still loads on a CPU without them.
    "adam": lambda: dict(
        # -ffp-contract=off: the kernel places every fused multiply-add itself, to round exactly
        # where torch's AdamW does (bit-exact fp32 master); -fno-math-errno lets sqrt vectorize; -fno-trapping-math lets branch-free selects vectorize (no FP traps are enabled).
        # -Wno-maybe-uninitialized, -Wno-uninitialized: GCC 12 warns inside its own AVX-512 intrinsics headers (_mm512_undefined).
        extra_compile_args=["-O3", "-fopenmp", "-pthread", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                            "-Wno-maybe-uninitialized", "-Wno-uninitialized"],
        extra_link_args=["-fopenmp", "-pthread"],
        libraries=[],
        define_macros=[],
        # The kernel body lives in .inc files included by both ISA builds: rebuild when they change.
        depends=sorted(glob.glob(os.path.join("csrc", "adam", "*.inc")) + glob.glob(os.path.join("csrc", "adam", "*.h"))),
    ),
}


def _extensions():
    if Pybind11Extension is None:
        # pip's build isolation installs pybind11 (pyproject.toml); a direct `python setup.py
        # build_ext` needs it in the environment, or nothing would be built without a word.
        sys.stderr.write("WARNING: pybind11 is not installed: the C++ extensions (fuyou._adam, fuyou._io) are not built; "
                         "`pip install pybind11` first, or build with `pip install -e .`\n")
        return []
    exts = []
    for bindings in sorted(glob.glob(os.path.join("csrc", "*", "bindings.cpp"))):
        name = os.path.basename(os.path.dirname(bindings))
        sources = sorted(glob.glob(os.path.join("csrc", name, "*.cpp")))
        settings = EXT_SETTINGS.get(name, lambda: dict(extra_compile_args=["-O3"]))()
        exts.append(
            Pybind11Extension(
                f"fuyou._{name}",
                sources,
                include_dirs=[os.path.join("csrc", name), "csrc"],
                cxx_std=17,
                **settings,
            )
        )
    return exts


class OptionalBuildExt(build_ext):
    """Build each extension; on failure warn and continue (fuyou runs on its Python fallbacks)."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            self._warn(f"C++ extensions not built ({exc}); fuyou will use its pure-Python paths")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"extension {ext.name} not built ({exc}); fuyou will use its pure-Python path")

    @staticmethod
    def _warn(msg):
        sys.stderr.write(f"WARNING: {msg}\n")


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

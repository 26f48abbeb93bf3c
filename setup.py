"""Builds the optional native extensions with CMake; metadata lives in pyproject.toml.

- ``fastpref._C``: the CPU kernels (the ``cpu`` backend).
- ``fastpref._C_cuda``: the CUDA kernels (the ``cuda`` backend), when CMake finds a CUDA compiler (nvcc).
  ``FASTPREF_NO_CUDA=1`` skips it.

Each is built in its own CMake tree and is optional: when CMake, pybind11 or a compiler is missing or
fails, this prints a warning and the package still installs without that module (``fastpref.backends()``
then reports why its backend is missing); a failing CUDA build never costs the CPU module. Extra CMake
arguments can be passed through the CMAKE_ARGS environment variable, e.g.
``CMAKE_ARGS="-DCMAKE_CXX_COMPILER=clang++" pip install -v .`` or
``CMAKE_ARGS="-DFASTPREF_PTXAS_VERBOSE=ON" pip install -v .`` (ptxas register and spill counts).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, cmake_args: tuple[str, ...] = (), backend: str = "cpu", missing: str = ""):
        # optional=True: setuptools then skips copying a library that was never built (editable installs).
        super().__init__(name, sources=[], optional=True)
        self.target = name.rpartition(".")[2]  # the CMake target
        self.cmake_args = list(cmake_args)
        self.backend = backend  # the fastpref backend the module provides
        self.missing = missing  # what users get instead


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


class _Skipped(Exception):
    """The module is not built on purpose (or for want of its compiler): a note, not a warning."""


def _tool(name: str) -> str | None:
    """A build tool from PATH, else from its PyPI wheel (the `cmake` / `ninja` packages)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
    except ImportError:
        return None
    candidate = Path(module.BIN_DIR if name == "ninja" else module.CMAKE_BIN_DIR) / name
    return str(candidate) if candidate.exists() else None


class CMakeBuild(build_ext):
    def finalize_options(self) -> None:
        super().finalize_options()
        # The two modules build at once, each in its own CMake tree (setuptools' parallel build_ext): one after
        # the other they took 18 s and 27 s on a 16-core GPU machine.
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        try:
            self._build_cmake(ext)
        except _Skipped as exc:
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            print(f"NOTE: {ext.name} is not built: {exc}; the '{ext.backend}' backend is unavailable.",
                  file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the pure-Python package must still install
            # A library left by an earlier build would otherwise be packaged as if this one had worked.
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            bar = "=" * 78
            print(f"\n{bar}\nWARNING: building the optional native extension {ext.name} failed:\n  {exc}\n"
                  f"fastpref is installed without it: the '{ext.backend}' backend is unavailable and\n"
                  f"{ext.missing}. See the CMake output above.\n{bar}\n",
                  file=sys.stderr, flush=True)

    def _build_cmake(self, ext: CMakeExtension) -> None:
        if ext.backend == "cuda" and _env_flag("FASTPREF_NO_CUDA"):
            raise _Skipped("FASTPREF_NO_CUDA is set")
        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("cmake >= 3.18 not found (pip install cmake)")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 not found (pip install 'pybind11>=2.12')") from exc

        config = "Debug" if self.debug else "Release"
        build_dir = Path(self.build_temp).resolve() / ext.name
        lib_dir = build_dir / "lib"
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{config.upper()}={lib_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        ninja = _tool("ninja")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += ext.cmake_args + shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # Always configure afresh: a cache left in build/ by an earlier isolated build names a cmake and
        # ninja from a build environment pip has since deleted, and reusing it fails the whole build.
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        if ext.backend == "cuda" and not _cache_has_cuda(build_dir / "CMakeCache.txt"):
            raise _Skipped("CMake found no CUDA compiler (nvcc); set CUDACXX or put nvcc on PATH")
        jobs = self.parallel or os.cpu_count() or 1
        start = time.monotonic()
        subprocess.run([cmake, "--build", str(build_dir), "--config", config, "--parallel", str(jobs),
                        "--target", ext.target], check=True)
        print(f"fastpref: built {ext.name} in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

        # CMake and setuptools may spell the ABI suffix differently; setuptools' name is the one imported.
        built = sorted(p for p in lib_dir.glob(f"{ext.target}.*") if p.suffix in (".so", ".pyd", ".dylib"))
        if not built:
            raise RuntimeError(f"CMake finished but produced no {ext.target} library in {lib_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


def _cache_has_cuda(cache: Path) -> bool:
    """Whether CMake's cache names a CUDA compiler (check_language(CUDA) found one)."""
    try:
        lines = cache.read_text().splitlines()
    except OSError:
        return False
    values = [line.partition("=")[2] for line in lines if line.startswith("CMAKE_CUDA_COMPILER:")]
    return bool(values) and bool(values[0]) and not values[0].endswith("NOTFOUND")


setup(
    ext_modules=[
        # The CPU module's tree never looks for CUDA: whatever the CUDA toolchain does cannot break it.
        CMakeExtension("fastpref._C", ["-DFASTPREF_CUDA=OFF"], backend="cpu",
                       missing="CPU tensors use the pure-PyTorch kernels"),
        CMakeExtension("fastpref._C_cuda", ["-DFASTPREF_CUDA=ON"], backend="cuda",
                       missing="CUDA tensors use the Triton (or PyTorch) kernels"),
    ],
    cmdclass={"build_ext": CMakeBuild},
)

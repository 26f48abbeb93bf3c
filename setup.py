"""Builds the optional native extension fastpref._C with CMake; metadata lives in pyproject.toml.

The extension is optional: when CMake, pybind11 or the compiler is missing or fails, this prints a
warning and the pure-Python package still installs (``fastpref.backends()`` then reports why the
``cpu`` backend is missing). Extra CMake arguments can be passed through the CMAKE_ARGS
environment variable, e.g. ``CMAKE_ARGS="-DCMAKE_CXX_COMPILER=clang++" pip install -v .``.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        # optional=True: setuptools then skips copying a library that was never built (editable installs).
        super().__init__(name, sources=[], optional=True)


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
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        try:
            self._build_cmake(ext)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the pure-Python package must still install
            # A library left by an earlier build would otherwise be packaged as if this one had worked.
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            bar = "=" * 78
            print(f"\n{bar}\nWARNING: building the optional native extension {ext.name} failed:\n  {exc}\n"
                  "fastpref is installed without it: the 'cpu' backend is unavailable and CPU tensors\n"
                  f"use the pure-PyTorch kernels. See the CMake output above.\n{bar}\n",
                  file=sys.stderr, flush=True)

    def _build_cmake(self, ext: CMakeExtension) -> None:
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
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # Always configure afresh: a cache left in build/ by an earlier isolated build names a cmake and
        # ninja from a build environment pip has since deleted, and reusing it fails the whole build.
        shutil.rmtree(build_dir, ignore_errors=True)
        build_dir.mkdir(parents=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = self.parallel or os.cpu_count() or 1
        subprocess.run([cmake, "--build", str(build_dir), "--config", config, "--parallel", str(jobs)],
                       check=True)

        # CMake and setuptools may spell the ABI suffix differently; setuptools' name is the one imported.
        built = sorted(p for p in lib_dir.glob("_C.*") if p.suffix in (".so", ".pyd", ".dylib"))
        if not built:
            raise RuntimeError(f"CMake finished but produced no _C library in {lib_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


setup(
    ext_modules=[CMakeExtension("fastpref._C")],
    cmdclass={"build_ext": CMakeBuild},
)

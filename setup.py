"""Build bmclip's C++ extension (bmclip._C) from csrc/ through CMake.

Package data: the top-level ``kernels/`` folder ships as ``bmclip.kernels`` so that the Triton
kernels stay importable with only torch and triton, and other projects can lift the folder as is.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("BMCLIP_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        ninja = shutil.which("ninja")
        if ninja and not (build_temp / "CMakeCache.txt").exists():
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    packages=find_packages(include=["bmclip", "bmclip.*"])
    + ["bmclip.kernels"]
    + ["bmclip.kernels." + p for p in find_packages(where="kernels")],
    package_dir={"bmclip": "bmclip", "bmclip.kernels": "kernels"},
    package_data={"bmclip": ["assets/*", "assets/**/*"]},
    ext_modules=[CMakeExtension("bmclip._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

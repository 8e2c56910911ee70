"""Build bmclip's C++ extension (bmclip._C) from csrc/ through CMake.

Package data: the top-level ``kernels/`` folder ships as ``bmclip.kernels`` so that the Triton
kernels stay importable with only torch and triton, and other projects can lift the folder as is;
``bmclip/assets/`` (vocabulary, sample figures) ships as data packages.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# pyproject.toml's SPDX `license` string needs setuptools >= 77; older ones fail with a schema dump.
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(
        f"bmclip needs setuptools>=77,<85 to build (this Python has setuptools {setuptools.__version__}): "
        f"{sys.executable} -m pip install 'setuptools>=77,<85'"
    )

# Data folders inside the package (the tokenizer vocabulary, sample figures) are declared as packages of
# their own so that setuptools ships their files (package_data) instead of warning about them.
ASSET_PACKAGES = ["bmclip.assets"] + [
    "bmclip.assets." + ".".join(p.relative_to(ROOT / "bmclip" / "assets").parts)
    for p in sorted((ROOT / "bmclip" / "assets").rglob("*"))
    if p.is_dir() and "__pycache__" not in p.parts
]


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        # CMake links into a staging folder; the result is then renamed into place, so a process that
        # has the old _C.so mapped (a test run during a rebuild) never sees a half-written library.
        extdir = (build_temp / "out").resolve()
        extdir.mkdir(exist_ok=True)
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
        built = extdir / dest.name
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_copy(built, dest)

    @staticmethod
    def _atomic_copy(src: Path, dst: Path) -> None:
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)

    def copy_file(self, infile, outfile, *args, **kwargs):
        # Editable installs copy the built library into the source tree: do that by rename as well.
        if str(outfile).endswith((".so", ".pyd")):
            self._atomic_copy(Path(infile), Path(outfile))
            return outfile, 1
        return super().copy_file(infile, outfile, *args, **kwargs)


setup(
    packages=find_packages(include=["bmclip", "bmclip.*"])
    + ASSET_PACKAGES
    + ["bmclip.kernels"]
    + ["bmclip.kernels." + p for p in find_packages(where="kernels")],
    package_dir={"bmclip": "bmclip", "bmclip.kernels": "kernels"},
    package_data={p: ["*"] for p in ASSET_PACKAGES},
    ext_modules=[CMakeExtension("bmclip._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

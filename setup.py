"""Build of lbe-ops: setuptools drives CMake (CMakeLists.txt), handing it TensorFlow's flags.

The op library must be compiled against the TensorFlow it will load into. With pip's default
build isolation, the build environment gets tensorflow-cpu==2.21.0 (pyproject.toml), whose C++
headers are the same as the GPU wheel's; `pip install --no-build-isolation .` builds against the
TensorFlow already installed instead. Environment variables:
  LBE_OPS_CUDA=auto|1|0     compile the CUDA kernels (auto: when nvcc is found)
  LBE_OPS_BUILD_JOBS=N      parallel build jobs (default: the number of cores)
  LBE_OPS_CMAKE_ARGS="..."  extra arguments for CMake (e.g. -DCMAKE_CUDA_ARCHITECTURES=90)
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _tensorflow_flags():
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - depends on the build environment
        raise RuntimeError(
            "lbe-ops compiles against TensorFlow, which this build environment cannot import. "
            "Use pip's default build isolation (it installs tensorflow-cpu==2.21.0 for the "
            "build), or install TensorFlow and use `pip install --no-build-isolation .`"
        ) from exc
    return (tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags(), tf.__version__)


def _build_tensorflow():
    """(distribution, version) of the TensorFlow this build compiles against, without importing
    it (metadata is prepared before the build and should stay cheap); (None, None) if absent."""
    from importlib import metadata
    names = metadata.packages_distributions().get("tensorflow", [])
    for name in [*names, "tensorflow-cpu", "tensorflow", "tensorflow-gpu", "tf-nightly"]:
        try:
            return name.replace("_", "-").lower(), metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def _long_description():
    """README plus a statement of the TensorFlow the compiled op was built for: the wheel's
    METADATA says it (as do its extras, `tensorflow-cpu==X.Y.*; extra == "cpu"`, and the
    lbe_ops/_build_info.json it carries, which the loader checks at import)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    dist, version = _build_tensorflow()
    if version:
        series = ".".join(version.split(".")[:2])
        text += (
            "\n\n## This build\n\n"
            f"Built for TensorFlow {series} (compiled against {dist}=={version}). The compiled op "
            f"loads into TensorFlow {series}.x, either `tensorflow` or `tensorflow-cpu`; with any "
            "other TensorFlow version `import lbe_ops` gives one RuntimeWarning and uses the "
            "pure-TensorFlow implementation (same numbers, slower).\n")
    return text


class CMakeBuild(build_ext):
    def build_extensions(self):
        # All the libraries come out of one CMake build; build it once.
        ext = self.extensions[0]
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        cflags, lflags, tf_version = _tensorflow_flags()
        args = [
            f"-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLBE_OPS_OUTPUT_DIR={out_dir}",
            f"-DLBE_OPS_CUDA={os.environ.get('LBE_OPS_CUDA', 'auto')}",
            f"-DTF_VERSION={tf_version}",
            "-DTF_CFLAGS=" + ";".join(cflags),
            "-DTF_LFLAGS=" + ";".join(lflags),
        ]
        try:
            import pybind11
            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        args += shlex.split(os.environ.get("LBE_OPS_CMAKE_ARGS", ""))
        jobs = os.environ.get("LBE_OPS_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "--parallel", jobs], check=True)


setup(
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    ext_modules=[CMakeExtension("lbe_ops._lbe_ops"), CMakeExtension("lbe_ops._core")],
    cmdclass={"build_ext": CMakeBuild},
)

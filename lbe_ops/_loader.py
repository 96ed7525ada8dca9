"""Loads the compiled op library once, and decides which backend a call takes.

Backends: 'op' (the compiled Lbe>* ops) and 'tf' (lbe_ops.reference, pure TensorFlow). The choice
comes from LBE_OPS_BACKEND=auto|op|tf (default auto), or from `use_backend(...)` for a block of
code. In auto, a library that is missing, cannot load, or was built for another TensorFlow gives
one warning and the 'tf' path; with 'op' those are errors. The same holds for a library built with
CUDA on a machine whose GPU its kernels cannot run on (a driver too old for the CUDA it was built
with, a GPU architecture it has no code for): TensorFlow would place the op on that GPU. Inside an
XLA-compiled function the op (which has no XLA kernel) is replaced by pure TensorFlow, whatever
the setting.
"""

import contextlib
import ctypes
import json
import os
import threading
import warnings
from pathlib import Path

import tensorflow as tf

# in_xla_context: part of this module's backend choice (lbe_ops.reference asks it too).
from lbe_ops._tf_compat import in_xla_context

_PACKAGE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "_lbe_ops.so"
BUILD_INFO_NAME = "_build_info.json"
_VALID_BACKENDS = ("auto", "op", "tf")


class LibraryUnavailableError(RuntimeError):
    """The compiled op library was asked for (LBE_OPS_BACKEND=op) but cannot be used."""


class _State:
    lock = threading.Lock()
    loaded = False
    module = None           # what tf.load_op_library returned
    library_path = None
    reason = None           # why the op is unavailable, if it is
    build_info = {}
    warned = False
    gpu = None              # _GpuState, once looked at


_local = threading.local()


def _library_path():
    override = os.environ.get("LBE_OPS_LIBRARY")
    return Path(override) if override else _PACKAGE_DIR / LIBRARY_NAME


def _read_build_info(library):
    info_path = library.with_name(BUILD_INFO_NAME)
    try:
        return json.loads(info_path.read_text())
    except (OSError, ValueError):
        return {}


def _major_minor(version):
    return tuple(version.split(".")[:2])


def _version_tuple(version, parts=2):
    try:
        return tuple(int(p) for p in str(version).split(".")[:parts])
    except ValueError:
        return None


def _driver_cuda_version(number):
    """cuDriverGetVersion's integer (12040) as (12, 4)."""
    return number // 1000, (number % 1000) // 10


def _architecture_images(spec):
    """CMake's CUDA_ARCHITECTURES ("80-real 90") as [(compute capability, kind, exact)], kind
    "sass" (machine code) or "ptx" (compiled by the driver at load time); exact for the
    arch-specific "90a". None where the spec says nothing checkable ("native", "all")."""
    images = []
    for token in str(spec or "").replace(";", " ").split():
        number, _, suffix = token.partition("-")
        exact = number[-1:].isalpha()
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        if not digits.isdigit() or suffix not in ("", "real", "virtual"):
            return None
        capability = (int(digits) // 10, int(digits) % 10)
        if suffix in ("", "real"):
            images.append((capability, "sass", exact))
        if suffix in ("", "virtual"):
            images.append((capability, "ptx", exact))
    return images or None


def gpu_kernel_problem(build_info, capabilities, driver_version):
    """Why the library's CUDA kernels cannot run on the visible GPUs, or None when they can.

    capabilities: the compute capability (major, minor) of each GPU TensorFlow sees (None where
    unknown); driver_version: cuDriverGetVersion's integer (12040 for CUDA 12.4), or None where
    it cannot be read. Machine code for sm_XY runs on X.Y and later minors of X (sm_XYa on X.Y
    only); PTX for compute_XY is compiled by the driver for X.Y and later GPUs, which needs a
    driver at least as new as the CUDA that wrote it. Within one CUDA major version, machine code
    runs on an older driver of the same major (minor version compatibility).
    """
    if not build_info.get("cuda"):
        return None
    if not capabilities:
        return None
    built = _version_tuple(build_info.get("cuda_version"))
    driver = _driver_cuda_version(driver_version) if driver_version else None
    built_text = build_info.get("cuda_version")
    if built and driver and driver[0] < built[0]:
        return (f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]}, but the op library was "
                f"built with CUDA {built_text}, which needs a driver for CUDA {built[0]}.0 or "
                "newer (upgrade the driver, or build lbe-ops with an older CUDA toolkit)")
    images = _architecture_images(build_info.get("cuda_architectures"))
    if images is None:
        return None
    ptx_usable = not (built and driver and driver < built)
    for index, capability in enumerate(capabilities):
        if capability is None:
            continue
        capability = tuple(capability)
        sass = any(kind == "sass" and (c == capability if exact else
                                       (c[0] == capability[0] and c[1] <= capability[1]))
                   for c, kind, exact in images)
        ptx = [c for c, kind, exact in images
               if kind == "ptx" and (c == capability if exact else c <= capability)]
        if sass or (ptx and ptx_usable):
            continue
        where = f"GPU {index} has compute capability {capability[0]}.{capability[1]}"
        if ptx:
            return (f"{where}, for which the op library has only PTX, which the driver (CUDA "
                    f"{driver[0]}.{driver[1]}) cannot compile: it was written by CUDA {built_text}")
        return (f"{where}, and the op library has no code for it (built for CUDA architectures "
                f"{build_info.get('cuda_architectures')})")
    return None


class _GpuState:
    def __init__(self, capabilities, driver_version, problem):
        self.capabilities = capabilities
        self.driver_version = driver_version
        self.problem = problem


def _visible_gpu_capabilities():
    """The compute capability of each GPU TensorFlow sees ([] for none)."""
    capabilities = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except Exception:  # details are informative only; the GPU is still there
            details = {}
        capabilities.append(details.get("compute_capability"))
    return capabilities


def _read_driver_version():
    """cuDriverGetVersion from the driver library (no CUDA context needed), or None."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if driver.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value or None
    except (OSError, AttributeError):
        return None


def _gpu_facts():
    """(capabilities of the visible GPUs, driver version or None); the driver is only asked when
    TensorFlow sees a GPU."""
    capabilities = _visible_gpu_capabilities()
    return capabilities, (_read_driver_version() if capabilities else None)


def _gpu_state(build_info):
    """Looks at the GPUs once per process."""
    if _State.gpu is None:
        capabilities, driver_version = _gpu_facts()
        _State.gpu = _GpuState(capabilities, driver_version,
                               gpu_kernel_problem(build_info, capabilities, driver_version))
    return _State.gpu


def _load():
    """Loads the library on first use; records the reason when it cannot."""
    with _State.lock:
        if _State.loaded:
            return _State.module
        _State.loaded = True
        library = _library_path()
        _State.library_path = str(library)
        _State.build_info = _read_build_info(library)
        built_with = _State.build_info.get("built_with_tf")
        if not library.exists():
            _State.reason = f"the op library {library} was not found (package not built?)"
        elif not built_with:
            _State.reason = f"{library.with_name(BUILD_INFO_NAME)} is missing or unreadable"
        elif _major_minor(built_with) != _major_minor(tf.__version__):
            # Never dlopen a library built for another TensorFlow: its C++ ABI differs, and an
            # undefined symbol is the mild outcome.
            _State.reason = (f"the op library was built for TensorFlow {built_with}, "
                             f"this is TensorFlow {tf.__version__}")
        else:
            try:
                _State.module = tf.load_op_library(str(library))
            except Exception as exc:  # NotFoundError, OSError, ...: whatever stops the load
                _State.reason = f"loading {library} failed: {exc}"
        if _State.module is not None:
            problem = _gpu_state(_State.build_info).problem
            if problem:
                # Loaded (its ops stay registered for saved models), but not used: TensorFlow
                # would run it on the GPU.
                _State.reason = f"its GPU kernels cannot run here: {problem}"
        return _State.module


def _usable(module):
    return module is not None and not (_State.gpu and _State.gpu.problem)


def configured_backend():
    """The backend asked for: use_backend() if active, else LBE_OPS_BACKEND, else 'auto'."""
    override = getattr(_local, "backend", None)
    if override is not None:
        return override
    value = os.environ.get("LBE_OPS_BACKEND", "auto").strip().lower() or "auto"
    if value not in _VALID_BACKENDS:
        raise ValueError(
            f"LBE_OPS_BACKEND must be one of {', '.join(_VALID_BACKENDS)}, got {value!r}")
    return value


@contextlib.contextmanager
def use_backend(name):
    """Forces 'op', 'tf' or 'auto' for calls made (and traced) in this thread inside the block."""
    if name not in _VALID_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_VALID_BACKENDS)}, got {name!r}")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def op_module():
    """The loaded op module, or None when the 'op' backend cannot be used."""
    return _load()


def use_op():
    """Decides, at call (or trace) time, whether this call takes the compiled op."""
    backend = configured_backend()
    if backend == "tf":
        return False
    module = _load()
    if not _usable(module):
        if backend == "op":
            raise LibraryUnavailableError(
                f"LBE_OPS_BACKEND=op, but the compiled op cannot be used: {_State.reason}")
        _warn_once()
        return False
    if in_xla_context():
        return False
    return True


def _warn_once():
    with _State.lock:
        if _State.warned:
            return
        _State.warned = True
    warnings.warn(
        f"lbe_ops: using the pure-TensorFlow implementation because {_State.reason}. "
        "Results are the same, only slower. Set LBE_OPS_BACKEND=tf to silence this warning.",
        RuntimeWarning, stacklevel=4)


def backend_info():
    """What this process uses: backend, why (if not the op), library path, build facts."""
    backend = configured_backend()
    module = None if backend == "tf" else _load()
    if backend == "tf":
        chosen, reason = "tf", "LBE_OPS_BACKEND=tf" if getattr(_local, "backend", None) is None \
            else "use_backend('tf')"
    elif not _usable(module):
        chosen, reason = "tf", _State.reason
    else:
        chosen, reason = "op", None
    info = _State.build_info if _State.loaded else _read_build_info(_library_path())
    built_with_cuda = bool(info.get("cuda", False))
    gpu = _gpu_state(info)
    if not gpu.capabilities:
        cuda_reason = "no GPU is visible to TensorFlow"
    elif not built_with_cuda:
        cuda_reason = "the op library was built without CUDA (the op runs on the CPU)"
    else:
        cuda_reason = gpu.problem
    driver = gpu.driver_version
    return {
        "backend": chosen,
        "reason": reason,
        "requested": backend,
        "library": _State.library_path or str(_library_path()),
        "built_with_tf": info.get("built_with_tf"),
        "tf_version": tf.__version__,
        "cuda": cuda_reason is None,
        "cuda_reason": cuda_reason,
        "gpus": len(gpu.capabilities),
        "cuda_driver_version": "%d.%d" % _driver_cuda_version(driver) if driver else None,
        "built_with_cuda": built_with_cuda,
        "cuda_version": info.get("cuda_version") or None,
        "cuda_architectures": info.get("cuda_architectures") or None,
        "xla": "inside jit_compile functions pure TensorFlow (backend tf) is used",
    }


def _register_ops_at_import():
    """Loads the library when lbe_ops is imported, so that its ops are registered for
    tf.saved_model.load / graph imports that contain them (nothing traces an lbe_ops call there,
    so a lazy load would never happen). LBE_OPS_BACKEND=tf keeps the library unloaded. A library
    that cannot be used is only recorded here; the warning comes at its first use."""
    if os.environ.get("LBE_OPS_BACKEND", "auto").strip().lower() != "tf":
        _load()


_register_ops_at_import()

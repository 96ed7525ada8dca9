"""Loads the compiled op library once, and decides which backend a call takes.

Backends: 'op' (the compiled Lbe>* ops) and 'tf' (lbe_ops.reference, pure TensorFlow). The choice
comes from LBE_OPS_BACKEND=auto|op|tf (default auto), or from `use_backend(...)` for a block of
code. In auto, a library that is missing, cannot load, or was built for another TensorFlow gives
one warning and the 'tf' path; with 'op' those are errors. Inside an XLA-compiled function the op
(which has no XLA kernel) is replaced by pure TensorFlow, whatever the setting.
"""

import contextlib
import json
import os
import threading
import warnings
from pathlib import Path

import tensorflow as tf

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
        return _State.module


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


def in_xla_context():
    """True while tracing a function that XLA will compile (jit_compile=True)."""
    from tensorflow.python.ops import control_flow_util  # no public equivalent
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def op_module():
    """The loaded op module, or None when the 'op' backend cannot be used."""
    return _load()


def use_op():
    """Decides, at call (or trace) time, whether this call takes the compiled op."""
    backend = configured_backend()
    if backend == "tf":
        return False
    module = _load()
    if module is None:
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
    elif module is None:
        chosen, reason = "tf", _State.reason
    else:
        chosen, reason = "op", None
    info = _State.build_info if _State.loaded else _read_build_info(_library_path())
    return {
        "backend": chosen,
        "reason": reason,
        "requested": backend,
        "library": _State.library_path or str(_library_path()),
        "built_with_tf": info.get("built_with_tf"),
        "tf_version": tf.__version__,
        "cuda": bool(info.get("cuda", False)),
        "cuda_version": info.get("cuda_version") or None,
        "cuda_architectures": info.get("cuda_architectures") or None,
        "xla": "inside jit_compile functions pure TensorFlow (backend tf) is used",
    }


def _register_ops_at_import():
    """Loads the library when lbe_ops is imported, so that its ops are registered for
    tf.saved_model.load / graph imports that contain them (nothing traces an lbe_ops call there,
    so a lazy load would never happen). LBE_OPS_BACKEND=tf keeps the library unloaded. A library
    that cannot be used is only recorded here; the warning comes at first use, as before."""
    if os.environ.get("LBE_OPS_BACKEND", "auto").strip().lower() != "tf":
        _load()


_register_ops_at_import()

"""What machine a benchmark ran on: CPU, ISA the kernels use, caches, memory, load."""

import os
import platform

import tensorflow as tf

import lbe_ops
from lbe_ops import _machine


def machine_info():
    """The platform, Python, TensorFlow and lbe_ops versions, the CPU (model, logical CPUs, the ISA
    the op's kernels use), caches, memory, TensorFlow's thread settings, the visible GPUs and
    lbe_ops' backend."""
    avx2_fma_f16c = {"avx2", "fma", "f16c"} <= _machine.cpu_flags()
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "lbe_ops": lbe_ops.__version__,
        "logical_cpus": os.cpu_count(),
        "cpu_model": _machine.cpu_model(),
        "cpu_isa": None,
        "memory_gb": _machine.memory_gb(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        "cpu_flags_avx2_fma_f16c": avx2_fma_f16c,
    }
    try:
        from lbe_ops import _core  # the pybind11 module, when built: the ISA the kernels use
        info["cpu_isa"] = _core.isa()
    except Exception:  # not built, or built without the CPU core
        forced = os.environ.get("LBE_OPS_CPU_ISA")
        info["cpu_isa"] = forced or ("avx2 (inferred from the CPU flags)"
                                     if avx2_fma_f16c else "generic")
    cache_sizes = _machine.caches()
    if cache_sizes is not None:
        info["caches_per_core_or_shared"] = cache_sizes
    info["gpus"] = visible_gpus()
    info["backend_info"] = {k: v for k, v in lbe_ops.backend_info().items() if k != "xla"}
    return info


def visible_gpus():
    """The GPUs TensorFlow sees: each one's name (its device name where TensorFlow has none)."""
    names = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except (ValueError, RuntimeError):
            details = {}
        names.append(details.get("device_name", device.name))
    return names

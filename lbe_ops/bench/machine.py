"""What machine a benchmark ran on: CPU, ISA the kernels use, caches, memory, load."""

import os
import platform

import tensorflow as tf

import lbe_ops


def machine_info():
    """The platform, Python, TensorFlow and lbe_ops versions, the CPU (model, logical CPUs, the ISA
    the op's kernels use), caches, memory, TensorFlow's thread settings, the visible GPUs and
    lbe_ops' backend."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "lbe_ops": lbe_ops.__version__,
        "logical_cpus": os.cpu_count(),
        "cpu_model": None,
        "cpu_isa": None,
        "memory_gb": None,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
    }
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
                      if ln.startswith("flags")), [])
        info["cpu_flags_avx2_fma_f16c"] = all(f in flags for f in ("avx2", "fma", "f16c"))
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from lbe_ops import _core  # the pybind11 module, when built: the ISA the kernels use
        info["cpu_isa"] = _core.isa()
    except Exception:  # not built, or built without the CPU core
        forced = os.environ.get("LBE_OPS_CPU_ISA")
        info["cpu_isa"] = forced or ("avx2 (inferred from the CPU flags)"
                                     if info.get("cpu_flags_avx2_fma_f16c") else "generic")
    try:
        caches = {}
        base = "/sys/devices/system/cpu/cpu0/cache"
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
            if kind != "Instruction":
                caches[f"L{level}"] = size
        info["caches_per_core_or_shared"] = caches
    except OSError:
        pass
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


def load_average():
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None

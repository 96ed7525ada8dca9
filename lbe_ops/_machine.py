"""What the operating system tells about the machine, for the records of runs and benchmarks:
the CPU's model and flags, memory, caches and load. No TensorFlow; None where the OS does not say.
"""

import os
import platform


def _cpuinfo(key):
    """The value of the first `key` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model():
    """The CPU's model name (/proc/cpuinfo, else platform.processor())."""
    return _cpuinfo("model name") or platform.processor() or None


def cpu_flags():
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it does not)."""
    return frozenset((_cpuinfo("flags") or "").split())


def memory_gb():
    """The machine's memory in GiB, to 0.1."""
    try:
        with open("/proc/meminfo") as f:
            return round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


def caches():
    """{"L1": size, "L2": ..., ...} of the first CPU's data and unified caches."""
    try:
        sizes = {}
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
                sizes[f"L{level}"] = size
        return sizes
    except OSError:
        return None


def load_average():
    """The 1, 5 and 15 minute load averages."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None

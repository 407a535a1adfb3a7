"""Fake of the nvidia-ml-py `pynvml` module for machines without a GPU.

FAKE_GPU_COUNT fake cards (1). A card's used memory is a fixed baseline plus whatever
live processes claim in state files `$FAKE_GPU_DIR/<pid>.json` =
{"used_bytes": N, "name": ..., "uuid": ...} (written by fake_vllm_server.py). A file counts
on the card with its "uuid", or on card 0 if it has none or no card has that UUID. A file
whose pid is gone counts for nothing, as on a real card memory is freed when its owner dies.

Env: FAKE_GPU_DIR, FAKE_GPU_COUNT (1), FAKE_GPU_TOTAL_MIB (16384), FAKE_GPU_TOTAL_MIBS
(comma list, one per card, overrides FAKE_GPU_TOTAL_MIB for the cards it covers),
FAKE_GPU_BASELINE_MIB (400, on every card), FAKE_GPU_NAME, FAKE_GPU_NAMES (comma list,
like FAKE_GPU_TOTAL_MIBS), FAKE_NVML_FAIL=1 (nvmlInit raises), FAKE_NVML_FLAKY=1
(every 5th nvmlDeviceGetMemoryInfo call raises, whatever the card), FAKE_NVML_PID_OFFSET=N
(process pids reported shifted by N, as host pids seen from inside a container), FAKE_NVML_STALL=N:S (the Nth
nvmlDeviceGetMemoryInfo call of a process takes S seconds, as a stalled driver call would).
"""

import glob
import json
import os
import threading
import time
from types import SimpleNamespace

MIB = 1024 * 1024

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_UNKNOWN = 999

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return _MESSAGES.get(self.value, "NVML error %s" % self.value)


_lock = threading.Lock()
_init_count = 0  # like real NVML: calls before nvmlInit (or after the last shutdown) fail
_meminfo_calls = 0


class _Handle:
    def __init__(self, index):
        self.index = index

    def __repr__(self):
        return "<fake nvmlDevice %d>" % self.index


def nvmlInit():
    global _init_count
    if os.environ.get("FAKE_NVML_FAIL") == "1":
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    with _lock:
        _init_count += 1


def nvmlShutdown():
    global _init_count
    with _lock:
        if _init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _init_count -= 1


def _check_init():
    if _init_count == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _check_handle(handle):
    _check_init()
    if not isinstance(handle, _Handle):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlSystemGetDriverVersion():
    _check_init()
    return "000.00-fake"


def nvmlSystemGetCudaDriverVersion():
    _check_init()
    return 13000


def gpu_count():
    return int(os.environ.get("FAKE_GPU_COUNT") or 1)


def gpu_uuid(index):
    # Card 0 keeps the one-card fake's UUID; the others end in "fak<index>", same length.
    if index == 0:
        return "GPU-00000000-0000-0000-0000-000000000fak"
    return "GPU-00000000-0000-0000-0000-" + ("fak%d" % index).rjust(12, "0")


def card_index(uuid):
    """The card with this UUID; card 0 for None or a UUID no card has."""
    for index in range(gpu_count()):
        if uuid == gpu_uuid(index):
            return index
    return 0


def _per_card(list_name, name, default, index):
    """Entry `index` of the comma list in env `list_name`, else env `name`, else `default`."""
    values = os.environ.get(list_name, "").split(",")
    if index < len(values) and values[index].strip():
        return values[index].strip()
    return os.environ.get(name, default)


def nvmlDeviceGetCount():
    _check_init()
    return gpu_count()


def nvmlDeviceGetHandleByIndex(index):
    _check_init()
    if not isinstance(index, int) or not 0 <= index < gpu_count():
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(index)


def nvmlDeviceGetName(handle):
    _check_handle(handle)
    return _per_card("FAKE_GPU_NAMES", "FAKE_GPU_NAME", "Tesla T4 (fake)", handle.index)


def nvmlDeviceGetUUID(handle):
    _check_handle(handle)
    return gpu_uuid(handle.index)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(pid, 0) but holds no memory any more.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _live_processes(index=None):
    """[(pid, used_bytes, name)] for state files whose process is alive, on card `index`
    (None: every card)."""
    gpu_dir = os.environ.get("FAKE_GPU_DIR")
    if not gpu_dir:
        return []
    out = []
    for path in sorted(glob.glob(os.path.join(gpu_dir, "*.json"))):
        try:
            pid = int(os.path.basename(path)[: -len(".json")])
            with open(path) as f:
                state = json.load(f)
            used = int(state["used_bytes"])
        except (ValueError, OSError, KeyError, TypeError):
            continue  # not a state file, half written, or removed meanwhile
        if index is not None and card_index(state.get("uuid")) != index:
            continue
        if _pid_alive(pid):
            out.append((pid, used, str(state.get("name", "python"))))
    return out


def total_bytes(index=0):
    return int(float(_per_card("FAKE_GPU_TOTAL_MIBS", "FAKE_GPU_TOTAL_MIB", "16384", index)) * MIB)


def used_bytes(index=0):
    baseline = int(float(os.environ.get("FAKE_GPU_BASELINE_MIB", "400")) * MIB)
    return baseline + sum(used for _, used, _ in _live_processes(index))


def nvmlDeviceGetMemoryInfo(handle, version=None):
    global _meminfo_calls
    _check_handle(handle)
    with _lock:
        _meminfo_calls += 1
        n = _meminfo_calls
    if os.environ.get("FAKE_NVML_FLAKY") == "1" and n % 5 == 0:
        raise NVMLError(NVML_ERROR_UNKNOWN)
    stall = os.environ.get("FAKE_NVML_STALL", "")  # "N:S": the Nth call (in this process) takes S seconds
    if stall and n == int(stall.split(":")[0]):
        time.sleep(float(stall.split(":")[1]))
    total = total_bytes(handle.index)
    used = min(used_bytes(handle.index), total)
    return SimpleNamespace(total=total, used=used, free=total - used, reserved=0)


def nvmlDeviceGetComputeRunningProcesses(handle):
    _check_handle(handle)
    # In a container NVML reports host pids, which the container's /proc does not show.
    offset = int(os.environ.get("FAKE_NVML_PID_OFFSET", "0"))
    return [
        SimpleNamespace(
            pid=pid + offset, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF
        )
        for pid, used, _ in _live_processes(handle.index)
    ]


nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses
nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses


def nvmlSystemGetProcessName(pid):
    _check_init()
    for p, _, name in _live_processes():
        if p == pid:
            return name
    raise NVMLError(NVML_ERROR_NOT_FOUND)

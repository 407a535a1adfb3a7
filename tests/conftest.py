"""Shared test helpers: the harness imported as a module, fake servers on free ports, a fake NVML."""
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
FAKE_SERVER = FAKES / "fake_vllm_server.py"
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def fresh_stop_state():
    """The harness's process-wide stop flags and secrets start clean in every test."""
    yield
    rx.HURRY.clear()
    rx.INTERRUPT_PENDING.clear()
    rx.STOPPING.clear()
    rx.SIGNALS_SEEN[0] = 0
    rx.SECRETS.clear()


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A fake card: state files of fake servers under FAKE_GPU_DIR, read by tests/fakes/pynvml.py."""
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    monkeypatch.setenv("FAKE_GPU_DIR", str(gpu_dir))
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "16384")
    monkeypatch.syspath_prepend(str(FAKES))
    sys.modules.pop("pynvml", None)
    import pynvml
    yield pynvml
    sys.modules.pop("pynvml", None)


def make_cfg(**overrides) -> "rx.Config":
    base = dict(preset="smoke", server_cmd=f"{sys.executable} {FAKE_SERVER}", port_a=free_port(),
                port_b=free_port(), start_timeout_s=20)
    base.update(overrides)
    return rx.validate_config(rx.Config(**base))


def wait_for(predicate, timeout=5.0, interval=0.02):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def alive(pid: int) -> bool:
    """A live, non-zombie process, read from /proc/<pid>/status (independent of the harness's helpers)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return state.split()[1] not in ("Z", "X")


# --- the whole script as a subprocess against the fakes
CARD_MIB, BASELINE_MIB = 16384, 400
FAST = ["--preset", "smoke", "--gap-s", "0.3", "--settle-s", "1", "--release-timeout-s", "5", "--idle-window-s", "0.5", "--overload-budget-gib", "0.25",
        "--prompt-tokens", "512", "--max-tokens", "64", "--burst-size", "8"]


def fake_env(gpu_dir: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(FAKES), FAKE_GPU_DIR=str(gpu_dir), FAKE_GPU_TOTAL_MIB=str(CARD_MIB),
               FAKE_GPU_BASELINE_MIB=str(BASELINE_MIB), FAKE_ITL_S="0.01", PYTHONUNBUFFERED="1",
               ENABLE_KVCACHED="true")   # a user's shell setting that must not leak into the static arm
    env.update(extra)
    return env


def script_args(results: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_experiments.py"), *FAST, "--results-dir", str(results),
            "--server-cmd", f"{sys.executable} {FAKE_SERVER}", "--port-a", str(free_port()),
            "--port-b", str(free_port()), *extra]



"""The real thing on a real card: vLLM + kvcached servers, NVML. Skipped unless RUN_GPU_TESTS=1 (CI has no
GPU). Models: local folders GPU_MODEL_A / GPU_MODEL_B (weights are not read: --load-format dummy).

    RUN_GPU_TESTS=1 python3 -m pytest -q tests/test_gpu.py
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

MODEL_A = os.environ.get("GPU_MODEL_A", "/tmp/kitmodels/Qwen2.5-0.5B-Instruct")
MODEL_B = os.environ.get("GPU_MODEL_B", "/tmp/kitmodels/Qwen2.5-1.5B-Instruct")


def vllm_servers() -> set[int]:
    """Pids of live processes whose command line names vLLM's API server module."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"vllm.entrypoints" in f.read():
                        found.add(int(entry))
            except OSError:
                pass
    return found


def smoke_run(tmp_path, experiments: str) -> tuple:
    """The script with the smoke preset on the real card: (its run folder, vLLM servers it left alive)."""
    before = vllm_servers()  # someone else's servers on a shared box are not ours to account for
    proc = subprocess.run(
        [
            sys.executable,
            "run_experiments.py",
            "--preset",
            "smoke",
            "--experiments",
            experiments,
            "--model-a",
            MODEL_A,
            "--model-b",
            MODEL_B,
            "--load-format",
            "dummy",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    left = vllm_servers() - before
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (run_dir,) = tmp_path.iterdir()
    return run_dir, left


@pytest.mark.gpu
def test_smoke_run_on_a_real_gpu(tmp_path):
    run_dir, left = smoke_run(tmp_path, "1")
    kvcached = json.loads((run_dir / "summary.json").read_text())["experiments"]["kvcached"]
    assert kvcached["memory_valid"] is True, kvcached.get("problems")
    assert kvcached["latency"]["failed"] == 0 and kvcached["latency"]["ok"] > 0
    assert kvcached["device"]["idle_after_load_mib"] > 1000, "the card holds the loaded model"
    assert kvcached["servers"]["A"]["memory"]["idle_before_workload_mib"] > 1000, "and it is the server's"
    assert not left, f"vLLM servers still alive after the run: {sorted(left)}"


@pytest.mark.gpu
def test_sleep_arm_on_a_real_gpu(tmp_path):
    """vLLM's sleep mode between bursts: the card is given back asleep, and every burst is served."""
    run_dir, left = smoke_run(tmp_path, "6")
    sleep = json.loads((run_dir / "summary.json").read_text())["experiments"]["sleep"]
    assert sleep["memory_valid"] is True and sleep["latency"]["failed"] == 0, sleep.get("problems")
    asleep, awake = sleep["device"]["idle_before_workload_mib"], sleep["device"]["peak_mib"]
    assert asleep < 0.2 * awake, "asleep it gives the static pool back"
    assert sleep["sleep"]["wake_s"]["n"] >= 2 and sleep["sleep"]["wake_s"]["max"] < 30
    assert not left, f"vLLM servers still alive after the run: {sorted(left)}"

"""Inside a container NVML reports host pids: per-server memory is then unavailable, never 0."""
import json
import subprocess

from conftest import fake_env, script_args


def test_host_pids_make_per_server_memory_unavailable_not_zero(tmp_path):
    (tmp_path / "gpu").mkdir()
    env = fake_env(tmp_path / "gpu", FAKE_NVML_PID_OFFSET="4000000")   # beyond any pid of this machine
    proc = subprocess.run(script_args(tmp_path / "results", "--experiments", "1", "--bursts", "1", "--no-warmup"),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run, = (tmp_path / "results").iterdir()
    summary = json.loads((run / "summary.json").read_text())["experiments"]["kvcached"]
    assert summary["servers"]["A"]["memory"]["idle_before_workload_mib"] is None
    assert summary["device"]["idle_before_workload_mib"] > 1000, "device totals stay valid"
    assert any("another PID namespace" in p for p in summary["problems"])
    assert "per-server memory is unavailable" in (run / "summary.md").read_text()

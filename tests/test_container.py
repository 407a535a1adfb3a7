"""Inside a container NVML reports host pids: per-server memory is then unavailable, never 0."""

import json
import os
from types import SimpleNamespace

import pytest
from conftest import background, fake_env, rx, script_args, succeeded_run


@background("host_pids_run", weight=3.5)
def host_pids_run_cmd(base):
    (base / "gpu").mkdir()
    env = fake_env(base / "gpu", FAKE_NVML_PID_OFFSET="4000000")  # beyond any pid of this machine
    return dict(
        args=script_args(base / "results", "--experiments", "1", "--bursts", "1", "--no-warmup"), env=env
    )


@pytest.fixture
def host_pids_run(background_runs):
    return succeeded_run(background_runs, "host_pids_run")


def test_host_pids_make_per_server_memory_unavailable_not_zero(host_pids_run):
    run = host_pids_run
    summary = json.loads((run / "summary.json").read_text())["experiments"]["kvcached"]
    assert summary["servers"]["A"]["memory"]["idle_before_workload_mib"] is None
    assert summary["device"]["idle_before_workload_mib"] > 1000, "device totals stay valid"
    assert any("another PID namespace" in p for p in summary["problems"])
    assert "per-server memory is unavailable" in (run / "summary.md").read_text()


def test_a_process_nvml_lists_without_its_memory_makes_the_servers_memory_unknown_not_zero():
    def rows(used):
        listed = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=used)]
        nvml = SimpleNamespace(nvmlDeviceGetComputeRunningProcesses=lambda handle: listed)
        server = SimpleNamespace(spec=SimpleNamespace(name="A"), proc=SimpleNamespace(pid=os.getpid()))
        (row,) = rx.process_rows(nvml, None, [server], {os.getpid(): server}, now=1.0)
        return row

    assert rows(5 * rx.MIB)["used_mib"] == 5.0 and "unattributed" not in rows(5 * rx.MIB)
    unknown = rows(None)  # NVML_VALUE_NOT_AVAILABLE
    assert unknown["used_mib"] is None and unknown["unattributed"] == rx.UNREPORTED
    assert rx.series([unknown], "process") == []

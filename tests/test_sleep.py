"""The third strategy: vLLM's sleep mode, put to sleep between bursts and woken by the first request."""

import json
import sys

import pytest
from conftest import (
    FAKE_SERVER,
    FAST,
    background,
    fake_env,
    free_port,
    make_cfg,
    rx,
    script_args,
    succeeded_run,
)


def run(fake_gpu, tmp_path, *extra, server_cmd=f"{sys.executable} {FAKE_SERVER}"):
    said = []
    rc = rx.main(
        [
            *FAST,
            "--results-dir",
            str(tmp_path / "results"),
            "--server-cmd",
            server_cmd,
            "--port-a",
            str(free_port()),
            "--port-b",
            str(free_port()),
            *extra,
        ],
        nvml_module=fake_gpu,
        out=said.append,
    )
    runs = list((tmp_path / "results").iterdir())
    return rc, said, runs[0] if runs else None


def test_only_the_sleep_arm_gets_sleep_mode():
    cfg = make_cfg()
    sleeping = rx.sleeping_server(cfg, "A", 0.55)
    static = rx.static_server(cfg, "A", 0.55)
    assert "--enable-sleep-mode" in rx.server_command(cfg, sleeping)
    assert "--enable-sleep-mode" not in rx.server_command(cfg, static)
    assert rx.server_env(cfg, sleeping, base={})["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in rx.server_env(cfg, static, base={})
    assert sleeping.key != static.key, "a static server is never reused as the sleep arm's"


def test_sleep_level_is_checked_and_level_2_needs_real_weights():
    with pytest.raises(rx.ConfigError, match="--sleep-level"):
        rx.validate_config(rx.Config(sleep_level=3))
    with pytest.raises(rx.ConfigError, match="--sleep-level 2 .* --load-format dummy"):
        rx.resolve_config(rx.Config(sleep_level=2, experiments="6", load_format="dummy"))
    assert rx.resolve_config(rx.Config(sleep_level=2, experiments="6")).sleep_level == 2
    assert rx.resolve_config(rx.Config(sleep_level=2, experiments="1", load_format="dummy"))


def test_waking_from_level_2_reloads_the_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(
        rx, "sleep_call", lambda server, path, key, body=None: calls.append((path, body)) or 0.1
    )
    server = type("S", (), {"asleep": True})()
    rx.WakeGate(server, "", level=2)()
    assert calls == [
        ("/wake_up", None),
        ("/collective_rpc", {"method": "reload_weights"}),
        ("/reset_prefix_cache", None),
    ]
    assert not server.asleep


@background("sleep_run", weight=11)
def sleep_run_cmd(base):
    (base / "gpu").mkdir()
    return dict(
        args=script_args(base / "results", "--experiments", "1,2,6"),
        env=fake_env(base / "gpu", FAKE_WAKE_S="0.2", FAKE_SLEEP_S="0.3"),
    )


@pytest.fixture
def sleep_run(background_runs):
    return succeeded_run(background_runs, "sleep_run")


def test_sleep_arm_end_to_end_against_kvcached_and_static(sleep_run):
    run_dir = sleep_run
    summary = json.loads((run_dir / "summary.json").read_text())
    sleep = summary["experiments"]["sleep"]
    assert sleep["sleep"]["level"] == 1 and sleep["sleep"]["wake_s"]["n"] == 2
    # at least the fake's 0.2 s wake-up and 0.3 s fall asleep (FAKE_WAKE_S, FAKE_SLEEP_S), and well under
    # ten times that: the time of the call itself, not of a poll or a retry around it
    assert 0.2 <= sleep["sleep"]["wake_s"]["mean"] < 2.0 and 0.3 <= sleep["sleep"]["sleep_s"]["mean"] < 3.0
    asleep, awake = sleep["device"]["idle_before_workload_mib"], sleep["device"]["peak_mib"]
    static_idle = summary["experiments"]["static"]["device"]["idle_before_workload_mib"]
    assert sleep["device"]["idle_after_load_mib"] == pytest.approx(asleep, abs=1), (
        "asleep as soon as it is up"
    )
    assert asleep < 0.2 * static_idle, "asleep it gives the static pool back"
    assert awake == pytest.approx(static_idle, abs=1), "awake for the bursts"
    assert sleep["device"]["release_s"] >= 0.3, "the release includes putting it back to sleep"
    assert sleep["latency"]["failed"] == 0
    assert sleep["latency"]["ttft_s"]["p50"] >= 0.2, "the first requests wait for the wake-up"
    block = summary["comparison"]["single_sleep"]
    assert block["asleep_mib"] == asleep and block["ttft_p50_vs_kvcached"] > 1
    md = (run_dir / "summary.md").read_text()
    assert "**vLLM sleep mode, one model (level 1):** asleep between bursts the card holds" in md


def test_a_server_without_the_sleep_endpoints_fails_the_experiment_saying_why(fake_gpu, tmp_path):
    # vLLM without VLLM_SERVER_DEV_MODE=1 has no /sleep: the experiment fails with the hint
    rc, said, run_dir = run(
        fake_gpu,
        tmp_path,
        "--experiments",
        "6",
        server_cmd=f"env -u VLLM_SERVER_DEV_MODE {sys.executable} {FAKE_SERVER}",
    )
    assert rc == 1
    error = json.loads((run_dir / "01_sleep" / "error.json").read_text())["error"]
    assert "/sleep?level=1" in error and "HTTP 404" in error and "VLLM_SERVER_DEV_MODE=1" in error


@background("shared_sleep_run", weight=10)
def shared_sleep_run_cmd(base):
    (base / "gpu").mkdir()
    return dict(args=script_args(base / "results", "--experiments", "3,7"), env=fake_env(base / "gpu"))


@pytest.fixture
def shared_sleep_run(background_runs):
    return succeeded_run(background_runs, "shared_sleep_run")


def test_two_sleeping_models_take_turns_each_at_the_full_share(shared_sleep_run):
    """B starts while A sleeps, at the same share; only the model that bursts is ever awake."""
    exp = shared_sleep_run / "02_shared_sleep"
    rows = rx.read_jsonl(exp / "memory.jsonl")
    record = json.loads((exp / "experiment.json").read_text())
    summary = json.loads((shared_sleep_run / "summary.json").read_text())
    servers = summary["experiments"]["shared_sleep"]["servers"]
    for slot in "AB":
        assert servers[slot]["latency"]["failed"] == 0
        assert servers[slot]["memory"]["peak_mib"] > 0.5 * 16384, "each gets the static arm's share awake"
    awake = {
        slot: [
            r["t"]
            for r in rows
            if r.get("kind") == "process" and r.get("server") == slot and r["used_mib"] > 0.5 * 16384
        ]
        for slot in "AB"
    }
    assert awake["A"] and awake["B"]
    assert not set(awake["A"]) & set(awake["B"]), "never both awake at one sample"
    assert all(b["wake_s"] is not None and b["sleep_s"] is not None for b in record["marks"]["bursts"])
    assert "shared_sleep" in summary["comparison"]

"""Answer sooner: lanes across cards (--gpus), kvcached pairs started together, a drift-free sampler,
the server's latency clock beside the client's, and where a run's time went."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import (
    FAKES,
    ROOT,
    background,
    fake_env,
    free_port,
    make_cfg,
    rx,
    signalled_run,
    two_card_args,
    wait_for,
)

ALL = rx.parse_experiments("all")


def names(lanes):
    return [[e.name for e in lane] for lane in lanes]


# --- scheduling: pure ----------------------------------------------------------------------------
def test_experiments_that_share_a_server_form_one_unit():
    cfg = rx.fill_preset(rx.Config())
    assert names(rx.server_units(ALL, cfg, 4 << 30)) == [
        ["kvcached", "shared_kvcached", "overload_kvcached"],
        ["static", "shared_static"],
        ["overload_static"],
        ["sleep", "shared_sleep"],
    ]


@pytest.mark.parametrize("lanes", [2, 3, 4])
def test_every_experiment_runs_once_in_some_lane_in_run_order(lanes):
    cfg = rx.fill_preset(rx.Config())
    plan = rx.plan_lanes(ALL, cfg, 4 << 30, 3, lanes)
    assert len(plan) == lanes
    assert sorted(e.name for lane in plan for e in lane) == sorted(e.name for e in ALL)
    for lane in plan:
        assert lane == sorted(lane, key=ALL.index)
    estimates = [rx.lane_estimate_s(lane, cfg, 4 << 30, 3) for lane in plan]
    assert max(estimates) < rx.lane_estimate_s(ALL, cfg, 4 << 30, 3) * 0.7, "parallel lanes end sooner"


def test_one_card_keeps_todays_order():
    cfg = rx.fill_preset(rx.Config())
    assert rx.plan_lanes(ALL, cfg, 4 << 30, 3, 1) == [ALL]


def test_the_seed_on_two_cards_starts_the_kvcached_pair_together_in_its_own_lane():
    cfg = rx.fill_preset(rx.Config(preset="seed"))
    plan = names(rx.plan_lanes(rx.parse_experiments("seed"), cfg, 4 << 30, 3, 2))
    assert ["shared_kvcached"] in plan


def test_two_cards_in_a_notebook_cell_are_refused_before_launch_naming_the_flag(monkeypatch):
    monkeypatch.setattr(rx, "script_file", lambda: None)  # pasted into a cell: no file to start per card
    with pytest.raises(rx.ConfigError, match=r"^--gpus: runs one process per card .* \(--gpu-index\)"):
        rx.validate_config(rx.Config(gpus="0,1"))
    rx.validate_config(rx.Config(gpus="1"))  # one card needs no second process


def test_a_lane_gets_its_own_card_and_ports():
    cfg = rx.Config(port_a=9001, port_b=9002)
    lane = rx.lane_config(cfg, 2, 5)
    assert (lane.gpu_index, lane.port_a, lane.port_b) == (5, 9201, 9202)
    assert rx.kvcached_server(lane, "A").ipc_name != rx.kvcached_server(cfg, "A").ipc_name


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(gpus="0,0"), "lists a card twice"),
        (dict(gpus="0;1"), "NVML indices separated by commas"),
        (dict(gpus="0,1", gpu_index=1), "either --gpus or --gpu-index"),
        (dict(gpus="0,1", port_a=65500, port_b=65501), "port"),
        (dict(gpus="0,1", port_a=8001, port_b=8101), "collides with another lane's ports"),
    ],
)
def test_bad_gpu_lists_are_refused_naming_the_flag(flags, message):
    with pytest.raises(rx.ConfigError, match=message):
        rx.validate_config(rx.Config(**flags))


def test_mixed_cards_are_refused_unless_allowed():
    cards = [
        {"index": 0, "name": "H200", "total_mib": 143771.0},
        {"index": 1, "name": "H100", "total_mib": 81559.0},
    ]
    with pytest.raises(rx.ConfigError, match="--allow-mixed-gpus"):
        rx.mixed_cards(cards, allow_mixed=False)
    assert rx.mixed_cards(cards, allow_mixed=True) is True
    assert rx.mixed_cards(cards[:1] * 2, allow_mixed=False) is False


def test_a_card_that_is_not_there_is_named(fake_gpu):
    with pytest.raises(rx.ConfigError, match="GPU index 3 out of range: this machine has 1 GPU"):
        rx.open_gpu(fake_gpu, [0, 3], "--gpus")


# --- the time accounting and the server's clock: pure ----------------------------------------------
def test_covered_seconds_count_overlaps_once():
    assert rx.covered_s([(0, 10), (5, 12), (20, 21)]) == 13
    assert rx.covered_s([]) == 0


VLLM_PAGE = """# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.5
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 4.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:generation_tokens_total{engine="0",model_name="m"} 999.0
"""


def test_metrics_page_keeps_only_what_is_read():
    assert rx.parse_metrics(VLLM_PAGE) == {
        "ttft_count": 4.0,
        "ttft_sum": 0.5,
        "e2e_count": 4.0,
        "e2e_sum": 2.0,
        "running": 7.0,
        "preemptions": 2.0,
    }


def test_metrics_lines_match_whole_names_with_any_labels():
    page = (
        'vllm:num_preemptions_total_extra{engine="0"} 5.0\n'  # a longer name: not ours
        'vllm:num_requests_waiting{model_name="a}b \\"c\\"",engine="0"} 3.0 1700000000\n'
        'vllm:num_requests_waiting{engine="1"} 2\n'
        "#vllm:num_requests_running 9\n"
    )
    assert rx.parse_metrics(page) == {"waiting": 5.0}


@pytest.fixture
def metrics_server():
    """A /metrics endpoint that can answer with an error, or close each connection after answering."""
    import http.server
    import threading

    state = {"status": 200, "close": False, "connections": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            state["connections"] += 1

        def do_GET(self):
            body = VLLM_PAGE.encode()
            self.send_response(state["status"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = state["close"]

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_the_sampler_reads_metrics_over_one_kept_connection(metrics_server):
    url, state = metrics_server
    kept = rx.Connections()
    for _ in range(3):
        assert rx.scrape_metrics(url, kept=kept)["running"] == 7.0
    assert state["connections"] == 1 and sum(map(len, kept.idle.values())) == 1
    state["close"] = True  # the server drops idle connections: the next read reconnects, no error
    assert rx.scrape_metrics(url, kept=kept)["running"] == 7.0
    assert rx.scrape_metrics(url, kept=kept)["running"] == 7.0
    state["status"] = 503
    with pytest.raises(rx.MetricsError, match="HTTP 503"):
        rx.scrape_metrics(url, kept=kept)
    kept.close()


def test_server_clock_is_the_histograms_delta_beside_the_clients_mean():
    marks = rx.Marks(
        bursts=[
            rx.BurstMark(
                "burst 1",
                "A",
                0,
                0.0,
                1.0,
                {"ttft_sum": 1.0, "ttft_count": 10, "e2e_sum": 5.0, "e2e_count": 10},
                {"ttft_sum": 1.2, "ttft_count": 12, "e2e_sum": 7.0, "e2e_count": 12},
            ),
            rx.BurstMark("burst 2", "A", 0, 2.0, 3.0, None, None),
        ]
    )  # /metrics unreadable: left out
    rows = [
        {"phase": "burst 1", "repeat": 0, "ok": True, "ttft_s": 0.13, "e2e_s": 1.02},
        {"phase": "burst 1", "repeat": 0, "ok": True, "ttft_s": 0.15, "e2e_s": 1.04},
        {"phase": "burst 1", "repeat": 0, "ok": False, "ttft_s": None, "e2e_s": 9.0},
        {"phase": "burst 2", "repeat": 0, "ok": True, "ttft_s": 5.0, "e2e_s": 5.0},
    ]
    clock = rx.server_clock(marks, rows)
    assert clock.server_ttft_mean_s == pytest.approx(0.1) and clock.client_ttft_mean_s == pytest.approx(0.14)
    assert clock.ttft_gap_ms == pytest.approx(40.0) and clock.e2e_gap_ms == pytest.approx(30.0)
    assert [(b.client_ok, b.server_counted) for b in clock.bursts] == [(2, 2)]
    assert clock.server_queue_mean_s is None, "a histogram the server lacks is n/a"
    assert rx.server_clock(rx.Marks(), rows) is None


# --- the sampler ---------------------------------------------------------------------------------
class ScriptedClock:
    """The device loop's clock: it moves only when the loop waits or a read takes time."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class ScriptedHalt:
    """The device loop's halt event: wait(s) moves the clock s ahead, and says stop once it is at `until`."""

    def __init__(self, clock, until):
        self.clock, self.until = clock, until

    def wait(self, seconds):
        self.clock.now += seconds
        return self.clock.now >= self.until


def scripted_device_loop(hz, until, read_takes):
    """Run rx.device_loop on a scripted clock; read_takes(n) is how long the nth read takes (from 1)."""
    clock, reads, lines = ScriptedClock(), [], []

    def read():
        reads.append(clock.now)
        clock.now += read_takes(len(reads))
        return types.SimpleNamespace(used=3 * 2**20, total=4 * 2**20)

    rx.device_loop(read, lines.append, lambda: None, ScriptedHalt(clock, until), hz, clock)
    samples = [float(line.split()[1]) for line in lines if line.startswith("d ")]
    missed = [int(line.split()[1]) for line in lines if line.startswith("m ")]
    return samples, missed


def tick(k: int) -> float:
    """Tick k of a 64 Hz sampler started at t=1000: binary fractions, exact on the scripted clock."""
    return 1000.0 + k / 64


def test_a_late_sampler_skips_ticks_and_counts_them_instead_of_bursting():
    # 64 Hz: ticks 1/64 s apart, binary fractions, exact on the scripted clock. The 6th read (tick 5)
    # takes twelve intervals and ends at tick 17; the loop runs until tick 32.
    samples, missed = scripted_device_loop(64, tick(32), lambda n: 12 / 64 if n == 6 else 0.0)
    assert samples[:6] == [tick(k) for k in range(6)]
    assert missed == [11], "ticks 6 to 16 are counted, not sampled"
    assert samples[6:] == [tick(k) for k in range(17, 32)], "back on the grid: no catch-up burst"


def test_slow_reads_keep_the_tick_grid_instead_of_drifting():
    # every read takes a third of an interval: the next tick is still due on the grid, not one interval
    # after the read ended
    samples, missed = scripted_device_loop(64, tick(20), lambda n: 1 / 192)
    assert samples == [tick(k) for k in range(20)] and missed == []


def test_the_slower_series_keeps_its_rate_however_long_its_reads_take(fake_gpu, tmp_path):
    # per-process, segment and /metrics reads that take 3/8 of the interval: each read still starts on
    # the 2 Hz grid, so a 1 s idle window holds two of them (waiting a whole interval after each read
    # would make it one every 0.875 s)
    sampler = rx.Sampler(rx.load_nvml(fake_gpu), 0, [], tmp_path / "memory.jsonl", 20, process_sample_hz=2)
    clock, reads = ScriptedClock(), []

    def slow_rows(now):
        reads.append(clock.now)
        clock.now += 3 / 8
        return []

    sampler.clock, sampler.halt, sampler.slow_rows = clock, ScriptedHalt(clock, 1003.0), slow_rows
    sampler.metrics_rows = lambda kept: []
    sampler._slow_loop()
    assert reads == [1000.0 + k / 2 for k in range(6)]


def test_a_stalled_device_read_is_counted_by_the_sampler(fake_gpu, tmp_path, monkeypatch):
    """The device process's count of skipped ticks reaches the sampler (the ticks on a scripted clock
    are above)."""
    monkeypatch.setenv("FAKE_NVML_STALL", "6:0.2")  # the device process's 6th read takes ten intervals
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    sampler.start()
    try:
        # a 0.2 s stall at 50 Hz: at least 9 ticks past when it ends, however late the process runs
        assert wait_for(lambda: sampler.missed_ticks >= 9, timeout=10)
        assert wait_for(lambda: len(sampler.device) >= 7, timeout=10), "and a sample after the stall"
    finally:
        sampler.stop()
    times = [t for t, _ in sampler.device]
    assert max(b - a for a, b in zip(times, times[1:])) >= 0.2, "the stalled ticks are not sampled"


def test_the_device_series_is_read_in_a_process_of_its_own(fake_gpu, tmp_path):
    """The interpreter lock of this process (hundreds of request threads in a burst) cannot delay it."""
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    sampler.start()
    try:
        assert sampler.child.pid != os.getpid() and sampler.child.poll() is None
        busy_from = time.time()
        busy_until = busy_from + 0.5
        while time.time() < busy_until:  # hold the interpreter: no sleep, no I/O
            sum(range(1000))
        held = time.time()
        assert wait_for(lambda: any(t > held for t, _ in sampler.device), timeout=10)
    finally:
        sampler.stop()
    during = [t for t, _ in sampler.device if busy_from <= t <= held]
    # 25 ticks fall due while this process holds its interpreter; the device process stamps them on its
    # own (a fifth of them is plenty on a busy machine)
    assert len(during) >= 5, during
    assert sampler.child.poll() is not None, "the device process ends with the sampler"


def test_a_sampler_that_cannot_read_the_card_says_why(fake_gpu, tmp_path, monkeypatch):
    nvml = rx.load_nvml(fake_gpu)
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")  # from here on nvmlInit fails: the device process's does
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    with pytest.raises(RuntimeError, match="did not start.*Driver Not Loaded"):
        sampler.start(first_sample_timeout_s=5)


def test_a_stop_while_the_sampler_starts_leaves_nothing_sampling(fake_gpu, tmp_path, monkeypatch):
    nvml, real_sleep = rx.load_nvml(fake_gpu), time.sleep
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)

    def stop_button(seconds):  # the notebook's stop, once, while the first device sample is awaited
        if threading.current_thread() is threading.main_thread() and not pressed:
            pressed.append(seconds)
            raise KeyboardInterrupt
        real_sleep(seconds)

    pressed: list[float] = []

    monkeypatch.setattr(rx.time, "sleep", stop_button)
    with pytest.raises(KeyboardInterrupt):
        sampler.start()
    monkeypatch.undo()
    assert sampler.child.poll() is not None, "the device process went on sampling"
    assert not sampler.is_alive() and not sampler.slow_thread.is_alive()


def test_buffered_rows_reach_the_file_within_about_a_second(fake_gpu, tmp_path):
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=20, process_sample_hz=2)
    sampler.start()
    try:
        assert wait_for(lambda: len(rx.read_jsonl(tmp_path / "memory.jsonl")) >= 20, timeout=3)
    finally:
        sampler.stop()
    assert len(rx.read_jsonl(tmp_path / "memory.jsonl")) == len(sampler.device), "every row written at stop"


# --- two fake cards, end to end --------------------------------------------------------------------
@background("two_card_run", weight=8)
def two_card_run_cmd(base):
    (base / "gpu").mkdir()
    args, port_a = two_card_args(base, "--ignore-eos", "--experiments", "seed")
    (base / "port_a").write_text(str(port_a))
    return dict(
        args=args, env=fake_env(base / "gpu", FAKE_GPU_COUNT="2", FAKE_FRONTEND_S="0.02"), timeout=240
    )


@pytest.fixture
def two_card_run(background_runs):
    result, base = background_runs.result("two_card_run")
    run_dir = next((base / "results").iterdir())
    return result, run_dir, int((base / "port_a").read_text())


def test_two_cards_run_every_experiment_once_each_on_its_lanes_card(two_card_run):
    result, run_dir, port_a = two_card_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    config = json.loads((run_dir / "config.json").read_text())
    lanes = config["lanes"]
    assert [lane["gpu_index"] for lane in lanes] == [0, 1]
    assert sorted(e for lane in lanes for e in lane["experiments"]) == [
        "kvcached",
        "shared_kvcached",
        "static",
    ]
    assert [lane["ports"] for lane in lanes] == [[port_a, port_a + 1], [port_a + 100, port_a + 101]]
    for lane in lanes:
        for name in lane["experiments"]:
            exp_dir = next(run_dir.glob(f"[0-9][0-9]_{name}"))
            record = json.loads((exp_dir / "experiment.json").read_text())
            assert record["gpu_index"] == lane["gpu_index"]
            assert {s["spec"]["port"] for s in record["servers"]} <= set(lane["ports"])
            assert all(s["env"]["CUDA_VISIBLE_DEVICES"] == lane["gpu_uuid"] for s in record["servers"])


def test_each_card_measures_only_its_own_servers(two_card_run):
    """The device total of every experiment is the card's baseline plus its own servers, though the
    other card's servers ran at the same time."""
    _, run_dir, _ = two_card_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, exp in summary["experiments"].items():
        own = sum(s["memory"]["idle_before_workload_mib"] for s in exp["servers"].values())
        assert exp["device"]["idle_before_workload_mib"] == pytest.approx(400 + own, abs=1), name


def test_two_cards_report_the_lanes_the_server_clock_and_the_time(two_card_run):
    _, run_dir, _ = two_card_run
    summary = json.loads((run_dir / "summary.json").read_text())
    md = (run_dir / "summary.md").read_text()
    assert "Cards (--gpus, experiments in parallel): GPU 0 ran" in md
    assert "Client vs server latency" in md and "harness's own time" in md
    timing = summary["timing"]
    assert summary["harness_overhead_s"] == timing["harness_overhead_s"] >= 0
    assert set(timing["lanes"]) == {"GPU 0", "GPU 1"}
    assert (
        timing["startups_s"] + timing["workload_s"] + timing["harness_overhead_s"] >= timing["table_s"] - 1e-6
    )
    for name, exp in summary["experiments"].items():
        clock = exp["server_clock"]
        assert all(b["server_counted"] == b["client_ok"] > 0 for b in clock["bursts"]), name
        assert clock["ttft_gap_ms"] >= 20 * 0.9, "the fake's 20 ms front end is outside the server's clock"
        assert clock["server_ttft_mean_s"] < clock["client_ttft_mean_s"]


def test_a_kvcached_pair_starts_together(two_card_run):
    _, run_dir, _ = two_card_run
    record = json.loads(
        next(run_dir.glob("[0-9][0-9]_shared_kvcached")).joinpath("experiment.json").read_text()
    )
    assert not record["reused"], "the seed's plan on two cards gives the pair a lane of its own"
    a, b = record["servers"]
    assert a["started_together_with"] == [b["label"]] and b["started_together_with"] == [a["label"]]
    assert abs(a["started_at"] - b["started_at"]) < 1.0


@background("two_card_interrupt", weight=3)
def two_card_interrupt_job(base):
    def scenario():
        (base / "gpu").mkdir()
        args, port_a = two_card_args(base, "--experiments", "1,2", "--bursts", "50", "--gap-s", "1")
        return signalled_run(
            base,
            args,
            fake_env(base / "gpu", FAKE_GPU_COUNT="2"),
            signal.SIGINT,
            settle_s=0.5,
            ports=(port_a, port_a + 1, port_a + 100, port_a + 101),
        )

    return scenario


@pytest.fixture
def two_card_interrupt(background_runs):
    return background_runs.result("two_card_interrupt")


def test_an_interrupt_stops_every_lane_and_every_server(two_card_interrupt):
    run = two_card_interrupt
    assert run["up"] and len(run["engines"]) == 2, "both lanes had a server up"
    assert run["rc"] == 130, run["out"][-3000:]
    assert not run["alive_after"] and not run["ports_taken"]
    assert "FAILED" not in run["out"], "an interrupted lane is not a failed experiment"


SIGNAL_AS_A_CARD_STARTS = f"""
import signal, subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
import run_experiments as rx

started = subprocess.Popen


def starting(*args, **kwargs):  # a SIGTERM lands just after a card's process exists, before it is kept
    process = started(*args, **kwargs)
    if "--lane-of" in args[0]:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    return process


subprocess.Popen = starting
sys.exit(rx.main(sys.argv[1:]))
"""


def test_a_signal_as_a_card_starts_reaches_that_card_and_no_other_starts(tmp_path):
    (tmp_path / "gpu").mkdir()
    args, _ = two_card_args(tmp_path, "--experiments", "1,2", "--bursts", "50", "--gap-s", "1")
    env = fake_env(tmp_path / "gpu", FAKE_GPU_COUNT="2")
    driver = [sys.executable, "-c", SIGNAL_AS_A_CARD_STARTS, *args[2:]]
    proc = subprocess.run(driver, env=env, capture_output=True, text=True, timeout=40)
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = (tmp_path / "results").iterdir()
    assert not list(run.glob("*/error.json")), "interrupted, not failed"
    assert not (run / "02_static").exists(), "the second card never started"


def test_arms_compared_across_cards_that_held_different_memory_are_said_to_be(tmp_path):
    # another job's 3,000 MiB on GPU 1, where static ran, read as 3,000 MiB more that kvcached "keeps less"
    summaries = {"kvcached": types.SimpleNamespace(gpu_index=0), "static": types.SimpleNamespace(gpu_index=1)}
    config = {"gpus": [{"index": 0, "used_mib_at_start": 400.0}, {"index": 1, "used_mib_at_start": 3400.0}]}
    apart = rx.cards_apart(config, summaries, "single")
    assert apart == "kvcached on GPU 0 (400 MiB in use before), static on GPU 1 (3,400 MiB in use before)"
    (line,) = [line for line in rx.cards_apart_lines(config, summaries) if line]
    assert line.startswith("**Compared across cards (single):** kvcached on GPU 0")
    alike = {"gpus": [{"index": 0, "used_mib_at_start": 400.0}, {"index": 1, "used_mib_at_start": 430.0}]}
    assert rx.cards_apart(alike, summaries, "single") is None, "within 64 MiB: compared alike"
    figures = {
        arm: types.SimpleNamespace(
            idle_after_load_mib=9711.2, idle_before_workload_mib=9711.2, peak_mib=9711.2, failed=0
        )
        for arm in summaries
    }
    block = rx.Comparison(figures=figures, ratios={})
    assert "memory not compared: the arms ran on cards" in "\n".join(rx.single_lines(block, apart))
    one_card = {name: types.SimpleNamespace(gpu_index=0) for name in summaries}
    assert rx.cards_apart(config, one_card, "single") is None and rx.cards_apart_lines(config, one_card) == []


def test_a_signal_during_the_import_check_of_a_two_card_run_ends_it_as_interrupted(monkeypatch, said):
    def check_then_signal(run):
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), (
            "a SIGTERM would end it at once"
        )
        raise KeyboardInterrupt("signal 15")  # what the installed handler raises

    monkeypatch.setattr(rx, "confirm_imports", check_then_signal)
    assert rx.run_lanes(types.SimpleNamespace(import_checks=object()), []) == (True, 0)
    assert any("no card's process has started" in line for line in said)


def test_a_stalled_slow_thread_does_not_stall_the_device_series(fake_gpu, tmp_path, monkeypatch):
    """Per-process, segment and /metrics reads can take long (a busy host, a slow server): the device
    series goes on at its rate meanwhile, and the slow rows still reach the file."""
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    real = sampler.slow_rows
    grew = []

    def slow_rows(now):
        # stalled until the device series has gone on by twenty samples (a stall of its own would never end)
        before = len(sampler.device)
        grew.append(wait_for(lambda: len(sampler.device) >= before + 20, timeout=10))
        return real(now) + [{"kind": "marker", "t": now}]

    monkeypatch.setattr(sampler, "slow_rows", slow_rows)
    sampler.start()
    try:
        assert wait_for(lambda: len(grew) >= 2, timeout=30)
    finally:
        sampler.stop()
    assert all(grew), "the device series went on while the slow reads were stalled"
    assert any(r["kind"] == "marker" for r in rx.read_jsonl(tmp_path / "memory.jsonl"))


def test_a_terminal_ctrl_c_does_not_end_the_device_process(fake_gpu, tmp_path):
    """The harness handles the interrupt (and stops the sampler); the process itself must not die of it."""
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    sampler.start()
    try:
        os.kill(sampler.child.pid, signal.SIGINT)
        before = len(sampler.device)
        assert wait_for(lambda: len(sampler.device) > before + 10, timeout=10)
        assert sampler.child.poll() is None
    finally:
        sampler.stop()
    assert "device sampler exited" not in sampler.error_kinds


# --- vLLM imported ahead (--preimport) --------------------------------------------------------------
def module_cfg(**overrides):
    """The fake run as `python -m fake_vllm_server`, the form --preimport can stage."""
    return make_cfg(server_cmd=f"{sys.executable} -m fake_vllm_server", **overrides)


def test_only_a_python_dash_m_command_can_be_imported_ahead():
    staged = rx.staged_command(["python3", "-m", "vllm.entrypoints.openai.api_server", "--port", "1"])
    assert staged[:2] == ["python3", "-c"] and staged[3:] == [
        "vllm.entrypoints.openai.api_server",
        "--port",
        "1",
    ]
    assert rx.staged_command(["python3", "tests/fakes/fake_vllm_server.py", "--port", "1"]) is None
    flagged = rx.staged_command(["python3", "-S", "-u", "-m", "fake_vllm_server", "--port", "1"])
    assert flagged[:4] == ["python3", "-S", "-u", "-c"] and flagged[5:] == ["fake_vllm_server", "--port", "1"]
    assert rx.staged_command(["python3", "-X", "importtime", "-m", "fake_vllm_server"]) is None


@pytest.mark.parametrize(
    "preimport, server_cmd, gpus, cores, on",
    [
        ("auto", "", "", 8, True),
        ("auto", "", "", 4, False),
        ("auto", "", "0,1", 8, False),
        ("auto", "", "0,1", 16, True),
        ("on", "", "", 2, True),
        ("off", "", "", 64, False),
        ("auto", "python3 my_server.py", "", 64, False),
    ],
)
def test_preimport_auto_needs_spare_cores_per_card_and_a_module_command(
    preimport, server_cmd, gpus, cores, on
):
    cfg = rx.Config(preimport=preimport, server_cmd=server_cmd, gpus=gpus)
    assert rx.preimport_on(cfg, cores=cores) is on


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preimport", "maybe"], "--preimport: must be auto, on or off"),
        (
            ["--preimport", "on", "--server-cmd", f"python3 {FAKES / 'fake_vllm_server.py'}"],  # a script
            "--preimport: on needs a server command",
        ),
    ],
)
def test_bad_preimport_settings_are_refused_naming_the_flag(flags, message):
    with pytest.raises(rx.ConfigError, match=re.escape(message)):
        rx.config_from_args(flags)


@pytest.mark.parametrize(
    "flags, shell, method",
    [
        ([], {}, "fork"),
        ([], {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, "spawn"),
        (["--engine-start", "spawn"], {}, "spawn"),
        (["--engine-start", "fork"], {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}, "fork"),
    ],
)
def test_vllms_engine_process_is_forked_unless_the_flag_or_the_shell_says_spawn(flags, shell, method):
    cfg = rx.config_from_args(flags)
    for spec in (
        rx.ServerSpec("A", "m", 8001, kvcached=True),
        rx.ServerSpec("A", "m", 8001, kvcached=False, gpu_memory_utilization=0.5, sleep_mode=True),
    ):
        assert rx.server_env(cfg, spec, shell)["VLLM_WORKER_MULTIPROC_METHOD"] == method
    with pytest.raises(rx.ConfigError, match="--engine-start: must be auto, fork or spawn"):
        rx.config_from_args(["--engine-start", "forkserver"])


def log_says_imported(server):
    return "imported in" in server.log_path.read_text()


def test_a_staged_server_imports_first_and_starts_only_when_released(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    monkeypatch.setenv("FAKE_IMPORT_S", "1.5")
    cfg = module_cfg()
    spec = rx.ServerSpec("A", "Qwen/Qwen2.5-0.5B-Instruct", cfg.port_a, kvcached=True)
    server = rx.start_server(cfg, spec, tmp_path / "server_A.log", staged=True)
    try:
        assert wait_for(lambda: log_says_imported(server), timeout=20)
        time.sleep(0.3)
        assert not rx.port_taken(cfg.host, cfg.port_a), "imported, but not serving before it is told to"
        assert not list(fake_gpu_dir().glob("*.json")), "nothing on the card before the start"
        rx.release_staged(cfg, server)
        startup = rx.wait_ready(server, timeout_s=20, poll_s=0.05)
        assert startup < 1.5, "the 1.5 s import was paid before the release"
        assert server.describe()["imported_ahead_from"] < server.started_at
    finally:
        rx.stop_servers([server], "end of test", grace_s=2)
    assert not server.live_pids()


def fake_gpu_dir():
    return Path(os.environ["FAKE_GPU_DIR"])


def test_a_staged_server_left_without_a_start_exits_and_a_pool_stops_it(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    cfg = module_cfg(preimport="on")
    spec = rx.ServerSpec("B", "Qwen/Qwen2.5-1.5B-Instruct", cfg.port_b, kvcached=True)
    orphan = rx.start_server(cfg, spec, tmp_path / "orphan.log", staged=True)
    orphan.proc.stdin.close()  # what the harness's end looks like to it when the harness is gone
    assert orphan.proc.wait(timeout=20) == 0 and not orphan.live_pids()
    pool = rx.ServerPool(cfg, ahead=rx.ahead_for(cfg))
    pool.prepare([spec], tmp_path)
    staged = pool.ahead.staged[spec.key]
    assert wait_for(lambda: log_says_imported(staged), timeout=20)
    rx.stop_servers(pool.shut(), "end of test")
    assert not staged.live_pids() and not pool.ahead.staged and not rx.port_taken(cfg.host, cfg.port_b)


def test_an_interrupt_as_a_server_imported_ahead_is_taken_stops_it(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    cfg = module_cfg(preimport="on")
    spec = rx.ServerSpec("B", "Qwen/Qwen2.5-1.5B-Instruct", cfg.port_b, kvcached=True)
    pool = rx.ServerPool(cfg, ahead=rx.ahead_for(cfg))
    pool.prepare([spec], tmp_path)
    staged = pool.ahead.staged[spec.key]
    assert wait_for(lambda: log_says_imported(staged), timeout=20)

    def interrupted(message):  # the signal lands once the server has been told to start
        if "imported ahead" in message:
            raise KeyboardInterrupt

    monkeypatch.setattr(rx, "say", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.ahead.take(spec)
    assert staged.stopped and not staged.live_pids(), "no list holds it any more: take stopped it"
    assert not pool.shut()


def test_the_pool_meets_a_server_made_ready_ahead_only_through_its_hooks(fake_gpu, tmp_path):
    cfg = make_cfg()
    calls = []

    class Recording(rx.Ahead):
        def prepare(self, specs, log_dir):
            calls.append(("prepare", [s.name for s in specs]))

        def take(self, spec):
            calls.append(("take", spec.name))

        def give_back(self, keep=()):
            calls.append(("give_back", sorted(k[0] for k in keep)))
            return []

    static = [
        rx.ServerSpec(name, "Qwen/Qwen2.5-0.5B-Instruct", port, kvcached=False, gpu_memory_utilization=0.3)
        for name, port in (("A", cfg.port_a), ("B", cfg.port_b))
    ]
    pool = rx.ServerPool(cfg, ahead=Recording())
    try:
        pool.ensure(static, tmp_path)
    finally:
        rx.stop_servers(pool.shut(), "end of test")
    assert [c[0] for c in calls] == ["give_back", "prepare", "take", "take", "give_back"]
    assert calls[1] == ("prepare", ["B"]), "the static server that starts second gets ready meanwhile"
    assert calls[2:4] == [("take", "A"), ("take", "B")] and calls[-1] == ("give_back", [])


@pytest.fixture
def preimport_run(sleep_and_preimport_run):
    return sleep_and_preimport_run


def test_a_run_imports_each_next_server_ahead_and_times_its_start_from_the_release(preimport_run):
    config = json.loads((preimport_run / "config.json").read_text())
    servers = config["servers"]
    assert len(servers) == 3 and all(s["imported_ahead_from"] < s["started_at"] for s in servers.values())
    # each later one paid its 1 s import while another experiment ran (more than its 1 s settle): the import
    # ended before the release, from which the start is timed. Not the first: it imported while the import
    # was checked, which began before it was spawned, so its release can come less than 1 s after
    later = sorted(servers.values(), key=lambda s: s["imported_ahead_from"])[1:]
    assert all(s["started_at"] - s["imported_ahead_from"] >= 1.0 for s in later)
    for s in servers.values():
        log = Path(s["log"]).read_text()
        imported = re.search(r"fake_vllm_server imported in [0-9.]+ s; waiting for the start", log)
        assert imported and imported.start() < log.index("fake vllm starting"), s["log"]
        assert s["startup_s"] == pytest.approx(s["ready_at"] - s["started_at"])
    timing = config["timing"]
    assert timing["table_start"] - timing["started"] > 1.0, "the first start waited for the import check"
    assert all(s["env"]["VLLM_WORKER_MULTIPROC_METHOD"] == config["engine_start"] for s in servers.values())
    assert f"engine process started by {config['engine_start']}" in (preimport_run / "summary.md").read_text()
    assert "✓ server: fake_vllm_server importable" in (preimport_run.parent.parent / "stdout.txt").read_text()
    summary = json.loads((preimport_run / "summary.json").read_text())
    assert all(exp["latency"]["ok"] > 0 for exp in summary["experiments"].values())


def test_a_failed_import_check_stops_the_servers_importing_beside_it_and_leaves_no_run(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    port = free_port()

    def failing_check(cfg, kvcached_needed):
        assert wait_for(lambda: staged_servers(port), timeout=20), "the first server imports meanwhile"
        return [rx.Check("vllm", False, "ImportError: libcudart.so.13", "reinstall the pair")]

    monkeypatch.setattr(rx, "check_serving_imports", failing_check)
    rc = rx.main(
        [
            "--experiments",
            "1",
            "--preimport",
            "on",
            "--server-cmd",
            f"{sys.executable} -m fake_vllm_server",
            "--results-dir",
            str(tmp_path / "r"),
            "--port-a",
            str(port),
            "--port-b",
            str(free_port()),
        ],
        nvml_module=fake_gpu,
    )
    captured = capsys.readouterr()
    assert (
        rc == 2
        and "✗ vllm: ImportError: libcudart.so.13" in captured.err
        and "reinstall the pair" in captured.err
    )
    assert "were stopped before they started" in captured.err
    assert not staged_servers(port) and not rx.port_taken("127.0.0.1", port)
    assert not list((tmp_path / "r").iterdir()), "no run folder is left for a run that never began"


def staged_servers(port: int) -> list[int]:
    """Live processes whose command line is a staged fake server on this port."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fake_vllm_server" in cmdline and str(port).encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_a_staged_server_whose_import_fails_is_reported_with_its_log_on_release(
    fake_gpu, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    cfg = make_cfg(server_cmd=f"{sys.executable} -m no_such_server_module")
    spec = rx.ServerSpec(
        "A", "Qwen/Qwen2.5-0.5B-Instruct", cfg.port_a, kvcached=False, gpu_memory_utilization=0.5
    )
    server = rx.start_server(cfg, spec, tmp_path / "server_A.log", staged=True)
    assert server.proc.wait(timeout=20) != 0
    with pytest.raises(rx.ServerError, match="while vLLM was being imported ahead") as failure:
        rx.release_staged(cfg, server)
    assert "No module named 'no_such_server_module'" in str(failure.value), "the log's tail is the evidence"


def test_a_pool_whose_staged_server_cannot_start_stops_it_and_says_why(fake_gpu, tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("PYTHONPATH", str(FAKES))
    cfg = module_cfg(preimport="on")
    spec = rx.ServerSpec("A", "Qwen/Qwen2.5-0.5B-Instruct", cfg.port_a, kvcached=True)
    pool = rx.ServerPool(cfg, ahead=rx.ahead_for(cfg))
    try:
        pool.prepare([spec], tmp_path)
        staged = pool.ahead.staged[spec.key]
        with socket.socket() as squatter:  # someone takes the port before its turn comes
            squatter.bind(("127.0.0.1", cfg.port_a))
            squatter.listen()
            with pytest.raises(rx.ServerError, match=f"port {cfg.port_a} is already"):
                pool.ensure([spec], tmp_path)
        assert not staged.live_pids() and not pool.running and not pool.ahead.staged
    finally:
        rx.stop_servers(pool.shut(), "end of test")


def test_smoke_reads_each_server_as_often_as_the_card_and_a_given_rate_wins():
    """Smoke's bursts last a fraction of a second: at other presets' 2 reads a second none falls in one."""
    assert rx.fill_preset(rx.Config(preset="smoke")).process_sample_hz == 20
    assert (
        rx.fill_preset(rx.Config()).process_sample_hz
        == rx.fill_preset(rx.Config(preset="seed")).process_sample_hz
        == 2
    )
    assert rx.fill_preset(rx.Config(preset="smoke", process_sample_hz=5)).process_sample_hz == 5
    assert rx.validate_config(rx.Config(preset="smoke", idle_window_s=0.5)), "10 reads in the idle window"
    with pytest.raises(
        rx.ConfigError, match="--idle-window-s: must hold at least 2 samples at --process-sample-hz 2 "
    ):
        rx.validate_config(rx.Config(idle_window_s=0.5))
    with pytest.raises(rx.ConfigError, match="--process-sample-hz: must be >= 0"):
        rx.validate_config(rx.Config(process_sample_hz=-1))

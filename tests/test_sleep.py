"""The third strategy: vLLM's sleep mode, put to sleep between bursts and woken by the first request."""

import contextlib
import json
import sys
import threading
import time
import types

import pytest
from conftest import (
    FAKE_SERVER,
    FAKE_SERVER_CMD,
    FAST,
    free_port,
    make_cfg,
    rx,
)


def run(fake_gpu, tmp_path, *extra, server_cmd=FAKE_SERVER_CMD):
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
    assert rx.wake_up(server, rx.Config(sleep_level=2)) == pytest.approx(0.3)
    assert calls == [
        ("/wake_up", None),
        ("/collective_rpc", {"method": "reload_weights"}),
        ("/reset_prefix_cache", None),
    ]
    assert not server.asleep


@pytest.fixture
def sleep_run(sleep_and_preimport_run):
    return sleep_and_preimport_run


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
    outside = 256  # the fake's memory outside vLLM's pool while awake (OUTSIDE_POOL)
    assert awake == pytest.approx(static_idle + outside, abs=1), "awake for the bursts, and more"
    assert sleep["device"]["release_s"] >= 0.3, "the release includes putting it back to sleep"
    assert sleep["latency"]["failed"] == 0
    assert sleep["latency"]["ttft_s"]["p50"] >= 0.2, "the first requests wait for the wake-up"
    block = summary["comparison"]["single"]
    assert block["figures"]["sleep"]["idle_before_workload_mib"] == asleep
    assert block["ratios"]["sleep/kvcached"]["ttft_s_p50"] > 1
    md = (run_dir / "summary.md").read_text()
    assert "**vLLM sleep mode, one model (level 1):** asleep between bursts the card holds" in md
    sleep_row = next(line for line in md.splitlines() if line.startswith("| sleep |"))
    assert sleep_row.count(" asleep |") == 2, "the main table says its idle levels are measured asleep"
    static_row = next(line for line in md.splitlines() if line.startswith("| static |"))
    assert "asleep" not in static_row
    assert "| flat |" in static_row, "a static pool's release: nothing to give back, not 0.00 s"


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


def test_a_wake_up_that_fails_halfway_leaves_the_server_known_awake_and_a_reuse_puts_it_to_sleep(
    monkeypatch,
):
    calls = []

    def post(server, path, api_key, body=None):
        calls.append(path)
        if path == "/collective_rpc":  # level 2: awake, but its weights could not be reloaded
            raise rx.ServerError("/collective_rpc on A answered HTTP 500")
        return 0.1

    monkeypatch.setattr(rx, "sleep_call", post)
    cfg = rx.Config(sleep_level=2)
    spec = rx.ServerSpec("A", "m", 8001, kvcached=False, gpu_memory_utilization=0.5, sleep_mode=True)
    server = types.SimpleNamespace(spec=spec, asleep=True, startup_s=1.0, stopped=False)
    with pytest.raises(rx.ServerError):
        rx.wake_up(server, cfg)
    assert server.asleep is False, "it holds its pool: the next sleep must not be skipped"

    monkeypatch.setattr(rx, "server_problem", lambda s: None)
    pool = rx.ServerPool(cfg)
    pool.running[spec.key] = server  # kept from the experiment that failed
    assert pool.ensure([spec], None) == [server] and server.asleep, "asleep before any other server starts"
    assert calls[-1] == "/sleep?level=2"


def test_each_servers_idle_memory_is_explained_and_sleep_frees_beyond_its_pool(sleep_run):
    """Weights and KV from the fake's log lines, the rest what the fake holds besides (its 300 MiB of
    overhead and 300 MiB of CUDA context; kvcached also its 64 MiB of pages kept after a burst); the
    sleep arm frees its pool and the memory outside it. Logged in GiB with two decimals: +-10 MiB."""
    summary = json.loads((sleep_run / "summary.json").read_text())
    servers = {name: e["servers"]["A"] for name, e in summary["experiments"].items()}
    for name, rest in (("kvcached", 600 + 64), ("static", 600)):
        f = servers[name]["footprint"]
        assert f["total_mib"] == servers[name]["memory"]["idle_before_workload_mib"]
        assert f["weights_mib"] == pytest.approx(1024, abs=10), "the fake's default model: 1 GiB"
        assert f["rest_mib"] == pytest.approx(rest, abs=10)
        assert f["weights_mib"] + f["kv_mib"] + f["rest_mib"] == pytest.approx(f["total_mib"])
    assert servers["kvcached"]["footprint"]["kv_mib"] == pytest.approx(32, abs=1), "the segment's prealloc"
    assert "footprint" not in servers["sleep"], "idle, it sleeps: nothing of its pool is on the card"
    split = servers["sleep"]["sleeps"]
    assert split["sleeps"] == 4, "after start-up, after the warm-up and after each of the two bursts"
    kv_pool = servers["static"]["footprint"]["kv_mib"]
    assert split["pool_freed_mib"] == pytest.approx(1024 + kv_pool, abs=10), "weights and KV"
    assert split["beyond_pool_mib"]["max"] == pytest.approx(300 + 256, abs=10), "overhead and outside"
    assert split["beyond_pool_mib"]["n"] == 3, "the sleeps after the warm-up and the two bursts"
    assert split["after_load_mib"] == pytest.approx(300, abs=10), "right after load: nothing regrown yet"
    figures = summary["comparison"]["single"]["figures"]
    assert figures["sleep"]["peak_mib"] - figures["static"]["peak_mib"] == pytest.approx(256, abs=1)
    md = (sleep_run / "summary.md").read_text()
    assert "| static | A static 0.55 | " in md and "What sleep mode frees" in md
    assert "and for kvcached the pages a burst left mapped that its segment no longer counts" in md, (
        "the rest says where kvcached's 64 MiB of kept pages went"
    )
    assert "- sleep: the awake peak exceeds the same static pool without sleep mode by 256 MiB" in md
    assert (sleep_run / "plots" / "footprint.png").stat().st_size > 0 and "plots/footprint.png" in md


def test_an_awake_peak_below_the_static_pool_is_said_as_below():
    # a smoke run on an H100: bursts of 4 regrew less outside the pool than start-up had taken (-2,074 MiB)
    assert rx.awake_peak_line("sleep", -2074.0) == (
        "- sleep: the awake peak stayed 2,074 MiB below the same static pool without sleep mode: the "
        "memory outside vLLM's cumem pool, freed at each sleep, regrew less in its bursts than at start-up."
    )
    assert "exceeds the same static pool without sleep mode by 256 MiB" in rx.awake_peak_line("sleep", 256.0)


# --- the sleep router under every model's traffic at once -------------------------------------------
class StubServer:
    def __init__(self, calls: list, name: str):
        self.asleep, self.calls, self.name = True, calls, name


def stub_router(
    monkeypatch, awake_at_most: int, models: str = "AB", wake_s: float = 0.0, **cfg
) -> tuple["rx.SleepRouter", list]:
    calls: list = []

    def to_sleep(server, cfg):
        if server.asleep:  # as put_to_sleep: nothing to do
            return None
        calls.append(("sleep", server.name))
        server.asleep = True
        return 0.01

    def wake(server, cfg):
        calls.append(("wake", server.name))
        time.sleep(wake_s)
        server.asleep = False
        return 0.02

    monkeypatch.setattr(rx, "put_to_sleep", to_sleep)
    monkeypatch.setattr(rx, "wake_up", wake)
    servers = {slot: StubServer(calls, slot) for slot in models}
    router = rx.SleepRouter(servers, rx.Config(sleep_after_idle_s=60, **cfg), awake_at_most)
    return router, calls


def test_the_router_wakes_a_model_for_its_request_and_puts_the_idle_one_to_sleep_first(monkeypatch):
    router, calls = stub_router(monkeypatch, awake_at_most=1)
    try:
        router.enter("A")
        router.enter("A")  # awake already: no second wake-up
        router.leave("A")
        router.leave("A")
        router.enter("B")
        router.leave("B")
    finally:
        router.stop()
    assert calls == [("wake", "A"), ("sleep", "A"), ("wake", "B"), ("sleep", "B")]
    assert [len(router.log[s]["waits"]) for s in "AB"] == [2, 1]
    assert router.log["A"]["wakes"] == [0.02] and router.log["B"]["sleeps"] == [0.01]


def test_a_request_that_never_gets_a_turn_awake_fails_at_the_request_timeout(monkeypatch):
    router, calls = stub_router(monkeypatch, awake_at_most=1, request_timeout_s=0.2)
    try:
        router.enter("A")  # and never leaves: A keeps the one place awake
        with pytest.raises(rx.ServerError, match="no turn awake for B within 0.2 s"):
            router.enter("B")
        router.enter("A")  # nobody waits any more: A takes requests again, though it drained for B
        router.leave("A")
    finally:
        router.leave("A")
        router.stop()
    assert ("wake", "B") not in calls
    # its wait counts, the longest of all: left out, "at most" read below the timeout its requests hit
    (waited,) = router.log["B"]["waits"]
    assert waited > 0.2 and router.log["B"]["gave_up"] == [waited]
    said = rx.router_lines(
        {
            "shared_sleep": types.SimpleNamespace(
                sleep=types.SimpleNamespace(router=rx.router_summary(router.log))
            )
        }
    )
    assert said[-1].endswith("; 1 never had a turn awake and failed"), said
    record = rx.RequestRecord("shared_sleep", "B", "window 1", 0, 0, 0, 0.0)
    rx.send_chat(
        "http://127.0.0.1:9",
        "m",
        rx.PlannedRequest(0, 0, "p", 4, 0.0),
        record,
        timeout_s=0.01,
        gate=FailingGate(),
    )
    assert record.error == "ServerError: no turn awake for B (the router's)", (
        "not 'timed out', which hides why"
    )


def request_thread(router, slot: str, order: list) -> threading.Thread:
    def send():
        with contextlib.suppress(rx.ServerError):
            router.enter(slot)
            order.append(slot)
            router.leave(slot)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_busy_model_takes_no_new_request_once_another_waits_for_its_place(monkeypatch):
    router, calls = stub_router(monkeypatch, awake_at_most=1, request_timeout_s=30)
    order: list[str] = []
    try:
        router.enter("A")  # A awake and busy
        b = request_thread(router, "B", order)
        assert until(lambda: "A" in router.draining), "B waits for the one place awake: A drains"
        a = request_thread(router, "A", order)  # came after B asked: waits for B's turn, not ahead of it
        time.sleep(0.1)
        assert order == [] and ("wake", "B") not in calls
        router.leave("A")
        b.join(10)
        a.join(10)
    finally:
        router.stop()
    assert order == ["B", "A"]
    assert calls == [
        ("wake", "A"),
        ("sleep", "A"),
        ("wake", "B"),
        ("sleep", "B"),
        ("wake", "A"),
        ("sleep", "A"),
    ]


def test_sleeping_models_get_their_turns_in_the_order_their_requests_came(monkeypatch):
    router, calls = stub_router(monkeypatch, awake_at_most=1, models="ABC", request_timeout_s=30)
    order: list[str] = []
    try:
        router.enter("A")  # A awake and busy
        threads = [request_thread(router, "C", order)]
        assert until(lambda: "A" in router.draining), "C waits for A's place: A drains"
        threads += [request_thread(router, "B", order) for _ in range(5)]  # more, but later
        assert until(lambda: len(router.queue) == 6)
        router.leave("A")
        for thread in threads:
            thread.join(10)
    finally:
        router.stop()
    assert order == ["C", *"BBBBB"], "C asked first"
    assert calls[:6] == [
        ("wake", "A"),
        ("sleep", "A"),
        ("wake", "C"),
        ("sleep", "C"),
        ("wake", "B"),
        ("sleep", "B"),
    ]


def test_a_model_that_cannot_be_put_to_sleep_makes_no_room_for_another(monkeypatch):
    router, calls = stub_router(monkeypatch, awake_at_most=1, request_timeout_s=30)

    def refuse(server, cfg):
        raise rx.ServerError(f"{server.name} answered 500 to /sleep")

    try:
        router.enter("A")
        router.leave("A")
        monkeypatch.setattr(rx, "put_to_sleep", refuse)
        with pytest.raises(rx.ServerError, match="A answered 500 to /sleep"):
            router.enter("B")
    finally:
        monkeypatch.undo()
        router.stopped.set()
    assert ("wake", "B") not in calls, "two awake where one fits"
    assert len(router.log["B"]["gave_up"]) == 1 and len(router.log["B"]["waits"]) == 1


def test_the_routers_stop_waits_for_a_wake_under_way_and_puts_that_model_to_sleep(monkeypatch):
    router, calls = stub_router(monkeypatch, awake_at_most=1, wake_s=0.3, request_timeout_s=30)
    order: list[str] = []
    thread = request_thread(router, "B", order)
    assert until(lambda: ("wake", "B") in calls)
    router.stop()  # while B wakes
    thread.join(10)
    assert router.servers["B"].asleep and calls[-1] == ("sleep", "B"), calls
    assert order == [] and router.log["B"]["gave_up"], "the workload ended before its request went"


class FailingGate:
    def __call__(self):
        time.sleep(0.02)  # past the request's deadline, as a router's wait for a turn is
        raise rx.ServerError("no turn awake for B (the router's)")

    def release(self):
        raise AssertionError("never entered: nothing to release")


def test_two_models_fit_awake_when_the_static_share_allows():
    assert rx.awake_at_most(rx.Config(gpu_memory_utilization=0.45)) == 2
    assert rx.awake_at_most(rx.Config(gpu_memory_utilization=0.55)) == 1
    assert rx.awake_at_most(rx.Config(gpu_memory_utilization=0.3)) == 3


# --- per-model means that must add up to the card's ---------------------------------------------------
def sleep_arm_sampled(
    folder, process_hz: float, offset_s: float = 0.0, asleep_beside: bool = False
) -> "rx.LoadedExperiment":
    """A sleep arm as an H100 smoke run recorded it: asleep 1,441 MiB on the card (948 its own), awake
    43,677 for 0.4 s bursts 1.5 s apart; the card read every 50 ms, the server's process tree at
    process_hz from offset_s. asleep_beside: a second one, B, asleep throughout (948 MiB, read as A's
    is), as in shared_sleep."""
    t0, workload, bursts = 1000.0, (5.0, 6.8), ((5.0, 5.4), (6.45, 6.8))
    names = ("A", "B") if asleep_beside else ("A",)

    def own(name, t):
        return 948 + (42729 if name == "A" and any(a <= t < b for a, b in bursts) else 0)

    exp = folder / "04_sleep"
    exp.mkdir()
    card = [(i * 0.05, 493 + sum(own(name, i * 0.05) for name in names)) for i in range(160)]
    device = [{"kind": "device", "t": t0 + t, "used_mib": used} for t, used in card]
    process = [
        {"kind": "process", "t": t0 + t, "server": name, "used_mib": own(name, t)}
        for t in (offset_s + k / process_hz for k in range(int(8 * process_hz)))
        for name in names
    ]
    rx.write_jsonl(exp / "memory.jsonl", sorted(device + process, key=lambda r: r["t"]))
    (exp / "requests.jsonl").touch()  # its requests are not what these tests read
    servers = [
        {"spec": {"name": name, "model": "m", "sleep_mode": True}, "label": f"{name} static + sleep mode"}
        for name in names
    ]
    servers = [{**server, "startup_s": 10.0} for server in servers]
    marks = {"idle_after_load": [t0 + 2, t0 + 3], "idle_before": [t0 + 3.5, t0 + 4.5]}
    marks.update(workload=[t0 + workload[0], t0 + workload[1]], sampling_end=t0 + 7.5)
    marks["bursts"] = [
        {"phase": "main", "server": "A", "repeat": 0, "start": t0 + start, "end": t0 + end}
        for start, end in bursts
    ]
    record = {"name": "sleep", "question": "q", "servers": servers, "sample_interval_s": 0.05}
    rx.write_json(exp / "experiment.json", {**record, "finished": True, "marks": marks})
    return rx.load_experiment(exp)


def sleep_lines(pool_gib: float, freed_gib: float, times: int) -> str:
    pool = f"CuMemAllocator: sleep freed {pool_gib} GiB memory in total\n"
    return (pool + f"Sleep mode freed {freed_gib} GiB memory, 1.50 GiB memory is still in use.\n") * times


def test_a_reused_servers_sleeps_are_counted_from_where_this_experiment_took_it(tmp_path):
    # the same server log holds an earlier experiment's 5 sleeps (12 GiB beyond the pool each), this one's
    # 3 (2 GiB beyond) and a later one's 4 (9 GiB beyond): only the 3 in this experiment's span count
    # as the run marked it: vLLM echoes its arguments, a progress bar redraws its line with \r
    start_up = "args: --api-key sk-a-long-secret-key\nLoading 50%\rLoading 100%\n"
    earlier, own = start_up + sleep_lines(41.0, 53.0, 5), sleep_lines(41.0, 43.0, 3)
    span = [earlier.count("\n"), (earlier + own).count("\n")]
    loaded = sleep_arm_sampled(tmp_path, process_hz=20)
    log = (earlier + own + sleep_lines(41.0, 50.0, 4)).replace("sk-a-long-secret-key", "***")  # scrubbed
    (loaded.path / "server_A.log").write_text(log)
    record = json.loads((loaded.path / "experiment.json").read_text())
    record["servers"][0].update(log=str(loaded.path / "server_A.log"), log_lines=span)
    record["reused"] = ["A static + sleep mode"]
    rx.write_json(loaded.path / "experiment.json", record)

    split = rx.summarize_experiment(rx.load_experiment(loaded.path), 0.05).servers["A"].sleeps
    assert (split.sleeps, split.beyond_pool_mib.max, split.this_experiment) == (3, 2 * 1024, True)
    summaries = {"sleep": types.SimpleNamespace(servers={"A": server_with(split)})}
    (line,) = [line for line in rx.sleep_split_lines(summaries, {}) if line.startswith("- ")]
    assert line.startswith("- sleep, A static + sleep mode: over the 3 sleeps of this experiment, each freed")

    # a killed run never closed the span: this experiment's stretch runs to the log's end (3 + 4 sleeps),
    # not the earlier experiment's stretch before its start
    record["servers"][0]["log_lines"] = span[:1]
    rx.write_json(loaded.path / "experiment.json", record)
    split = rx.summarize_experiment(rx.load_experiment(loaded.path), 0.05).servers["A"].sleeps
    assert (split.sleeps, split.beyond_pool_mib.max, split.this_experiment) == (7, 9 * 1024, True)

    # a run from before the marks, or with the byte offsets of one commit: the whole log, said as such
    record["servers"][0]["log_lines"] = span
    record["servers"][0]["log_span"] = record["servers"][0].pop("log_lines")
    rx.write_json(loaded.path / "experiment.json", record)
    split = rx.summarize_experiment(rx.load_experiment(loaded.path), 0.05).servers["A"].sleeps
    assert (split.sleeps, split.this_experiment) == (12, None)  # 5 + 3 + 4
    assert "this_experiment" not in rx.to_json(split), "summary.json of older runs keeps its shape"


def server_with(split: "rx.SleepSplit"):
    return types.SimpleNamespace(label="A static + sleep mode", reused=True, sleeps=split)


def test_a_lone_servers_memory_is_the_cards_less_what_the_card_held_beside_it(tmp_path):
    # at 2 Hz its own series misses its 0.4 s bursts; the card's, read every 50 ms, does not
    lone = rx.summarize_experiment(sleep_arm_sampled(tmp_path, process_hz=2, offset_s=0.42), 0.05)
    own = lone.servers["A"]
    assert own.memory_cost.mean_mib == pytest.approx(lone.memory_cost.mean_mib - 493)
    assert own.memory.peak_mib == lone.device.peak_mib - 493 == 948 + 42729
    assert own.memory.idle_before_workload_mib == 948 and not lone.problems


def test_per_model_means_that_miss_the_cards_are_void_and_say_why(tmp_path):
    slow = rx.summarize_experiment(sleep_arm_sampled(tmp_path, process_hz=2, asleep_beside=True), 0.05)
    assert slow.memory_cost.mean_mib > 10_000 and slow.servers["A"].memory_cost is None
    (problem,) = [p for p in slow.problems if p.startswith("per-model memory means n/a")]
    assert "shortest burst lasted 0.35 s and each server was read every 0.50 s" in problem
    advice = "raise --process-sample-hz to 23 or more (about 8 samples a burst) or lengthen the bursts"
    assert problem.endswith(f"{advice} (--max-tokens))")
    md = rx.markdown_summary({}, {"sleep": slow}, {}, None)
    assert "| sleep | 1.8 |" in md and md.split("| sleep | 1.8 |")[1].split("\n")[0].endswith("| n/a |")

    (tmp_path / "fast").mkdir()
    fast = rx.summarize_experiment(sleep_arm_sampled(tmp_path / "fast", 20, asleep_beside=True), 0.05)
    means = [fast.servers[name].memory_cost.mean_mib for name in "AB"]
    assert sum(means) == pytest.approx(fast.memory_cost.mean_mib - 493, rel=0.05)
    assert not fast.problems


def test_per_model_figures_across_a_stall_of_a_servers_own_reads_are_void_and_say_why(tmp_path):
    loaded = sleep_arm_sampled(tmp_path, 20, asleep_beside=True)
    rows = rx.read_jsonl(loaded.path / "memory.jsonl")
    stalled = [
        r for r in rows if not (r["kind"] == "process" and r["server"] == "A" and 1005.0 <= r["t"] < 1005.8)
    ]
    (loaded.path / "memory.jsonl").unlink()
    rx.write_jsonl(loaded.path / "memory.jsonl", stalled)  # A's reads failed through its first burst
    summary = rx.summarize_experiment(rx.load_experiment(loaded.path), 0.05)
    assert summary.servers["A"].memory_cost is None and summary.servers["A"].memory.peak_mib is None
    assert summary.servers["B"].memory_cost is None, "the models' means are read together"
    (problem,) = [p for p in summary.problems if p.startswith("per-model memory means and peaks n/a")]
    assert (
        "A's process memory was not read for 0.8 s of the workload (reads every 0.05 s otherwise" in problem
    )
    assert summary.memory_cost is not None, "the card's own series is whole"


def test_per_model_peaks_below_the_cards_are_void_and_say_why(tmp_path):
    # read at 2 Hz between the bursts, the server's own series never sees it awake
    loaded = sleep_arm_sampled(tmp_path, process_hz=2, offset_s=0.42, asleep_beside=True)
    missed = rx.summarize_experiment(loaded, 0.05)
    assert missed.device.peak_mib == 493 + 948 + 42729 + 948 and missed.servers["A"].memory.peak_mib is None
    assert missed.servers["A"].memory.idle_before_workload_mib == 948, "the idle level stays"
    (problem,) = [p for p in missed.problems if p.startswith("per-model memory peaks n/a")]
    assert "they add up to 1,896 MiB, but the card held 44,625 MiB for the servers" in problem
    assert any(p.startswith("per-model memory means n/a") for p in missed.problems)

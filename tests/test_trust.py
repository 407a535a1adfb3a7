"""Faults a user meets on a shared GPU box: each one handled, nothing leaked, no wrong number with rc 0.
Numbered as the failure-handling table in the README."""

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import (
    FAKE_SERVER,
    FAST,
    KVC_A,
    KVCACHED_ENV_SECRET,
    SECRET_KEY,
    SECRET_TOKEN,
    STATIC_A,
    alive,
    background,
    fake_env,
    free_port,
    in_process_args,
    make_cfg,
    ready,
    rx,
    script_args,
    two_card_args,
    wait_for,
)


def descendants(root: int) -> set[int]:
    """Every process below root, read from /proc by the test itself."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, stack = set(), list(kids.get(root, []))
    while stack:
        pid = stack.pop()
        out.add(pid)
        stack.extend(kids.get(pid, []))
    return out


def port_free(port: int) -> bool:
    """Bindable the way vLLM binds its port, SO_REUSEADDR: connections the kill left in TIME_WAIT do not
    block the next server, a socket still listening does."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(cfg, spec, wait=True):
        server = rx.start_server(cfg, spec, tmp_path / f"server_{spec.name}_{len(started)}.log")
        started.append(server)
        if wait:
            ready(server)
        return server

    yield start
    rx.STATE.hurry.set()
    rx.stop_servers(started, "end of test")


# 1. Servers die with the harness ------------------------------------------------------------------
@background("sigkill_scenario", weight=2.5)
def sigkill_scenario_job(base):
    def scenario():
        (base / "gpu").mkdir()
        # the fake engine, like vLLM 0.24's EngineCore, outlives its API server unless someone stops it
        env = fake_env(base / "gpu", FAKE_ORPHAN_ENGINE="1", FAKE_ITL_S="0.05")
        args = script_args(base / "results", "--experiments", "3", "--bursts", "20", "--no-warmup")
        harness = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            bursting = wait_for(lambda: list((base / "results").glob("*/01_*/requests.jsonl")), timeout=60)
            ours = descendants(harness.pid)
            samplers = [
                p for p in ours if "nvmlDeviceGetMemoryInfo" in Path(f"/proc/{p}/cmdline").read_text()
            ]
            ports = [int(args[args.index(flag) + 1]) for flag in ("--port-a", "--port-b")]
            harness.kill()
            harness.wait()
            gone = wait_for(lambda: not any(alive(p) for p in ours), timeout=10)
            return {
                "bursting": bursting,
                "ours": ours,
                "gone": gone,
                "samplers": samplers,
                "left": [p for p in ours if alive(p)],
                "ports_free": [port_free(p) for p in ports],
                "engines_alive": [
                    int(p.stem)
                    for p in (base / "gpu").glob("*.json")
                    if p.stem.isdigit() and alive(int(p.stem))
                ],
            }
        finally:
            if harness.poll() is None:
                harness.kill()
                harness.wait()

    return scenario


@pytest.fixture
def sigkill_scenario(background_runs):
    return background_runs.result("sigkill_scenario")


def lane_process(harness: int, gpu_index: int) -> int:
    """The pid of the harness's process running GPU gpu_index's lane (--gpus)."""
    for pid in descendants(harness):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--lane-of" in args and args[args.index(b"--gpu-index") + 1] == str(gpu_index).encode():
            return pid
    raise AssertionError(f"no process for GPU {gpu_index}'s lane")


def two_card_kill(base: Path, whom: str) -> dict:
    """A two-card run; once both lanes have a server up, SIGKILL `whom` ('lane 1': GPU 1's process;
    'harness': the first one), and say what was left."""
    (base / "gpu").mkdir()
    args, port_a = two_card_args(base, "--experiments", "1,2", "--bursts", "4", "--no-warmup")
    env = fake_env(base / "gpu", FAKE_GPU_COUNT="2", FAKE_ITL_S="0.03")
    harness = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        bursting = wait_for(lambda: len(list((base / "gpu").glob("*.json"))) >= 2, timeout=60)
        ours = descendants(harness.pid)
        os.kill(lane_process(harness.pid, 1) if whom == "lane 1" else harness.pid, signal.SIGKILL)
        out, _ = harness.communicate(timeout=60)
        gone = wait_for(lambda: not any(alive(p) for p in ours), timeout=10)
        ports = (port_a, port_a + 1, port_a + 100, port_a + 101)
        return dict(
            bursting=bursting,
            rc=harness.returncode,
            out=out,
            gone=gone,
            left=[p for p in ours if alive(p)],
            ports_free=all(port_free(p) for p in ports),
            run_dir=next((base / "results").iterdir()),
        )
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.communicate()


@background("lane_killed_scenario", weight=4)
def lane_killed_job(base):
    return lambda: two_card_kill(base, "lane 1")


@background("two_card_sigkill_scenario", weight=3)
def two_card_sigkill_job(base):
    return lambda: two_card_kill(base, "harness")


@pytest.fixture
def lane_killed_scenario(background_runs):
    return background_runs.result("lane_killed_scenario")


@pytest.fixture
def two_card_sigkill_scenario(background_runs):
    return background_runs.result("two_card_sigkill_scenario")


def test_main_without_arguments_in_a_notebook_hands_notebook_args_on_not_the_kernels(monkeypatch):
    handed = []

    def prepare_run(cfg, argv, nvml_module):
        handed.append(argv)  # what each card's process and config.json would be given
        raise rx.ConfigError("stop here")

    monkeypatch.setattr(rx, "prepare_run", prepare_run)
    monkeypatch.setattr(rx, "running_in_notebook", lambda: True)
    monkeypatch.setattr(rx, "NOTEBOOK_ARGS", "--preset smoke --experiments 1,2")
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/kernel-x.json"])
    assert rx.main(out=lambda _: None) == 2
    assert handed == [["--preset", "smoke", "--experiments", "1,2"]]


def test_a_file_left_by_another_percent_run_is_not_taken_for_this_script(monkeypatch, tmp_path):
    assert rx.script_file() == rx.__file__
    other = tmp_path / "other.py"
    other.write_text("print('not the harness')\n")
    monkeypatch.setitem(rx.__dict__, "__file__", str(other))  # `%run -i other.py`, then the pasted cell
    assert rx.script_file() is None, "each card's process would have run other.py"


@pytest.mark.parametrize("code, failed", [(0, 1), (1, 1), (130, 0)])
def test_a_cards_process_that_ends_before_its_experiments_did_fails_them_whatever_its_exit_code(
    tmp_path, code, failed
):
    # exit 1 is also any uncaught exception's: an experiment with neither a finished record nor an error was
    # left out of the summary, and the run said all was well; 130 is an interrupt, which the report says
    done, lost = rx.parse_experiments("1,2")
    run = types.SimpleNamespace(run_dir=tmp_path, config={"servers": {}}, experiments=[done, lost])
    rx.experiment_dir(run, done).mkdir()
    rx.write_json(rx.experiment_dir(run, done) / "experiment.json", {"finished": True})
    lane = types.SimpleNamespace(cfg=types.SimpleNamespace(gpu_index=1), experiments=[done, lost])
    assert rx.gather_lane(run, lane, code) == failed
    assert not (rx.experiment_dir(run, done) / "error.json").exists()


def test_a_cards_process_that_dies_fails_its_experiment_and_the_run_still_reports(lane_killed_scenario):
    run = lane_killed_scenario
    assert run["bursting"] and run["rc"] == 1, run["out"][-3000:]
    config = json.loads((run["run_dir"] / "config.json").read_text())
    (killed,) = [lane["experiments"] for lane in config["lanes"] if lane["gpu_index"] == 1]
    (other,) = [lane["experiments"] for lane in config["lanes"] if lane["gpu_index"] == 0]
    for name in killed:
        error = json.loads(next(run["run_dir"].glob(f"0*_{name}/error.json")).read_text())["error"]
        assert error == "the process running GPU 1's lane ended (exit code -9) before it finished"
    summary = json.loads((run["run_dir"] / "summary.json").read_text())
    assert sorted(folder.split("_", 1)[1] for folder in summary["failed"]) == sorted(killed)
    assert all(summary["experiments"][name]["latency"]["failed"] == 0 for name in other)
    assert run["gone"] and run["ports_free"], run["left"]


def test_sigkill_of_the_first_process_of_a_two_card_run_stops_every_lane(two_card_sigkill_scenario):
    run = two_card_sigkill_scenario
    assert run["bursting"] and run["rc"] == -9
    assert run["gone"], f"every lane's process, keeper and server is gone: {run['left']}"
    assert run["ports_free"]


def test_sigkill_of_the_harness_mid_burst_leaves_nothing_running(sigkill_scenario):
    run = sigkill_scenario
    assert run["bursting"], "bursting"
    assert len(run["ours"]) >= 7, "two keepers, two API servers, two engines, the device sampler"
    assert len(run["samplers"]) == 1, "the device-memory process is among them, and goes too"
    assert run["gone"], run["left"]
    assert all(run["ports_free"])
    assert not run["engines_alive"]


def test_server_ending_on_its_own_takes_its_orphaned_engine_along(fake_gpu, servers, monkeypatch):
    monkeypatch.setenv("FAKE_ORPHAN_ENGINE", "1")
    monkeypatch.setattr(rx, "KEEPER_GRACE_S", 0.5)  # how long the keeper waits before SIGKILL (4 s)
    cfg = make_cfg()
    server = servers(cfg, STATIC_A(cfg))
    tree = server.tree()
    (api_server,) = [p for p in tree if rx.proc_stat(p)[1] == server.proc.pid]
    os.kill(api_server, signal.SIGKILL)
    assert wait_for(lambda: server.exit_code() is not None, timeout=10), "the keeper reports the death"
    assert server.exit_code() == 128 + signal.SIGKILL
    assert not any(alive(p) for p in tree)


# 2. Cleanup survives impatience -------------------------------------------------------------------
def signal_once_stopping(sig, after_s=0.0):
    """Send sig to this process once a stop is under way (rx.STOPPING), after_s later."""

    def fire():
        if wait_for(rx.STATE.stopping.is_set, timeout=20, interval=0.005):
            time.sleep(after_s)
            os.kill(os.getpid(), sig)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def long_grace(monkeypatch):
    monkeypatch.setattr(rx, "STOP_GRACE_S", 30.0)  # what a stop waits after SIGINT before SIGKILL


def test_a_signal_during_a_stop_lets_it_finish_then_ends_the_run(fake_gpu, servers, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ignore_sigint")  # SIGINT alone would never stop it; SIGKILL does
    monkeypatch.setattr(rx, "STOP_GRACE_S", 1.0)
    cfg = make_cfg()
    pool = rx.ServerPool(cfg)
    server = servers(cfg, STATIC_A(cfg))
    pool.running[server.spec.key] = server
    tree = server.tree()
    previous = rx.install_stop_signals()
    try:
        signal_once_stopping(signal.SIGTERM)  # during the 1 s grace after the SIGINT the server ignores
        with pytest.raises(KeyboardInterrupt):
            rx.stop_servers([server], "between experiments")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not any(alive(p) for p in tree), "the server was stopped before the run ended"
    assert server.stopped and not pool.shut(), "and left the pool only once gone"
    assert not rx.STATE.hurry.is_set(), "one signal does not skip the graceful stages"


def test_second_signal_while_stopping_kills_at_once(fake_gpu, servers, monkeypatch, long_grace):
    monkeypatch.setenv("FAKE_MODE", "ignore_sigint")  # SIGINT alone would never stop it
    cfg = make_cfg()
    server = servers(cfg, STATIC_A(cfg))
    tree = server.tree()
    rx.STATE.signals_seen = 1  # the first Ctrl-C started this stop
    previous = rx.install_stop_signals()
    begin = time.time()
    try:
        signal_once_stopping(signal.SIGINT, after_s=0.2)
        with pytest.raises(KeyboardInterrupt):
            rx.stop_servers([server], "end of test")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert time.time() - begin < 5, "not the 30 s grace"
    assert not any(alive(p) for p in tree)


def test_notebook_interrupt_while_stopping_kills_instead_of_abandoning(
    fake_gpu, servers, monkeypatch, long_grace
):
    monkeypatch.setenv("FAKE_MODE", "ignore_sigint")
    cfg = make_cfg()
    server = servers(cfg, STATIC_A(cfg))
    tree = server.tree()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # what a notebook kernel has
    try:
        signal_once_stopping(signal.SIGINT, after_s=0.2)  # in the stop's wait, as a notebook user would
        with pytest.raises(KeyboardInterrupt):
            rx.stop_servers([server], "end of test")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not any(alive(p) for p in tree)


@background("double_ctrl_c_scenario", weight=4)
def double_ctrl_c_scenario_job(base):
    def scenario():
        (base / "gpu").mkdir()
        env = fake_env(base / "gpu", FAKE_MODE="ignore_sigint")
        args = script_args(base / "results", "--experiments", "1", "--bursts", "50", "--no-warmup")
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            bursting = wait_for(lambda: list((base / "results").glob("*/01_*/requests.jsonl")), timeout=60)
            ours = descendants(proc.pid)
            engines = [int(p.stem) for p in (base / "gpu").glob("*.json") if p.stem.isdigit()]
            proc.send_signal(signal.SIGINT)
            # the stop has begun: SIGINT to the server, which ignores it, then 15 s of grace
            stopping = wait_for(lambda: any("press Ctrl-C again" in line for line in lines), timeout=30)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            begin = time.time()
            # the servers are killed at once; the run then writes its summary and report before it ends
            wait_for(lambda: not any(alive(p) for p in engines), timeout=60)
            took = time.time() - begin
            proc.wait(timeout=60)
            left = [p for p in ours if alive(p)]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(timeout=10)
        return {
            "bursting": bursting,
            "stopping": stopping,
            "took": took,
            "engines": engines,
            "rc": proc.returncode,
            "out": "".join(lines),
            "ours": ours,
            "left": left,
        }

    return scenario


@pytest.fixture
def double_ctrl_c_scenario(background_runs):
    return background_runs.result("double_ctrl_c_scenario")


def test_double_ctrl_c_of_the_script_kills_servers_and_says_so(double_ctrl_c_scenario):
    run = double_ctrl_c_scenario
    out = run["out"]
    assert run["bursting"] and run["stopping"], out[-2000:]
    # the second Ctrl-C kills the servers at once: well inside the SIGINT grace (15 s) it skips
    assert run["engines"] and run["took"] < rx.STOP_GRACE_S, out[-2000:]
    assert run["rc"] == 130
    assert "press Ctrl-C again to kill it now" in out and "killing the servers now" in out
    assert run["ours"] and not run["left"]


# 3. Own your port ---------------------------------------------------------------------------------
def test_port_bound_but_not_listening_is_refused(fake_gpu, tmp_path):
    cfg = make_cfg()
    foreign = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), "--model", "m", "--host", "127.0.0.1", "--port", str(cfg.port_a)],
        env=dict(os.environ, FAKE_STARTUP_S="30"),
        stdout=open(tmp_path / "foreign.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_for(lambda: b"fake vllm starting" in (tmp_path / "foreign.log").read_bytes(), timeout=10)
        time.sleep(0.3)  # it binds right after that line
        with socket.socket() as probe:  # a bind probe is fooled by SO_REUSEADDR
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", cfg.port_a))
        with pytest.raises(rx.ServerError, match="bound by a process that does not listen yet"):
            rx.start_server(cfg, STATIC_A(cfg), tmp_path / "never.log")
    finally:
        foreign.kill()
        foreign.wait()


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_health_from_someone_elses_server_is_not_ready(fake_gpu, servers, tmp_path):
    # our "server" never listens; a stranger answers /health on the port once ours has started
    cfg = make_cfg(server_cmd=f"{sys.executable} -c 'import time; time.sleep(60)'")
    server = servers(cfg, STATIC_A(cfg), wait=False)
    stranger = ThreadingHTTPServer(("127.0.0.1", cfg.port_a), Healthy)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    try:
        with pytest.raises(rx.ServerError, match="does not belong to our server"):
            rx.wait_ready(server, timeout_s=10)
    finally:
        stranger.shutdown()
        stranger.server_close()


@background("two_runs_scenario", weight=6)
def two_runs_scenario_job(base):
    def scenario():
        (base / "gpu").mkdir()
        env = fake_env(base / "gpu")
        first_args = script_args(base / "first", "--experiments", "1", "--bursts", "6")
        ports = [
            "--port-a",
            first_args[first_args.index("--port-a") + 1],
            "--port-b",
            first_args[first_args.index("--port-b") + 1],
        ]
        first = subprocess.Popen(
            first_args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            serving = wait_for(lambda: list((base / "first").glob("*/01_*/warmup.jsonl")), timeout=60)
            # the first run holds still while the second one runs (its servers go on serving): on a busy
            # machine its six bursts could otherwise be over before the second run got to its preflight
            first.send_signal(signal.SIGSTOP)
            try:
                second = subprocess.run(
                    script_args(base / "second", "--experiments", "1") + ports,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                first_still_running = first.poll() is None
            finally:
                first.send_signal(signal.SIGCONT)
            out, _ = first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()
        return {
            "serving": serving,
            "second": second,
            "first_still_running": first_still_running,
            "first_rc": first.returncode,
            "first_out": out,
            "first_dir": base / "first",
        }

    return scenario


@pytest.fixture
def two_runs_scenario(background_runs):
    return background_runs.result("two_runs_scenario")


def test_two_runs_on_the_same_ports_second_fails_first_intact(two_runs_scenario):
    run = two_runs_scenario
    second = run["second"]
    assert run["serving"] and run["first_still_running"], (
        "the second run met the first one serving\n" + run["first_out"][-2000:] + second.stdout[-1000:]
    )
    assert second.returncode == 2, "refused by the preflight, before anything launched"
    assert "already in use: listened on by pid" in second.stderr
    assert not list((run["first_dir"].parent / "second").glob("*/"))
    assert run["first_rc"] == 0, run["first_out"][-2000:]
    (first_run,) = run["first_dir"].iterdir()
    summary = json.loads((first_run / "summary.json").read_text())["experiments"]["kvcached"]
    assert summary["memory_valid"] and summary["latency"]["failed"] == 0
    assert summary["servers"]["A"]["memory"]["idle_before_workload_mib"] > 500, "its own server's memory"


# 4. Never signal a stranger -----------------------------------------------------------------------
def test_a_pid_that_left_the_tree_is_never_signalled(fake_gpu, servers, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_MODE", "grandchild")
    cfg = make_cfg()
    server = servers(cfg, KVC_A(cfg))
    grandchild_file = tmp_path / "gpu" / "grandchild.pid"
    assert wait_for(grandchild_file.exists)
    grandchild = int(grandchild_file.read_text())
    assert grandchild in server.tree()
    os.kill(grandchild, signal.SIGKILL)  # its pid is freed; a stranger may get it next
    assert wait_for(lambda: grandchild not in server.live_pids(), timeout=10)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # nothing is remembered: the keeper signals what is below it when it stops, read afresh
        assert stranger.pid not in server.tree()
        rx.stop_servers([server], "end of test", grace_s=5)
        assert stranger.poll() is None, "the stranger survived"
    finally:
        stranger.kill()
        stranger.wait()


# 5. A request is OK only if it completed ----------------------------------------------------------
def request(tokens=8):
    return rx.PlannedRequest(burst=0, index=0, prompt="hello there", max_tokens=tokens, temperature=0.0)


def send(server, timeout_s=30.0, tokens=8):
    record = rx.RequestRecord("t", "A", "p", 0, 0, 0, 0.0)
    return rx.send_chat(
        server.url, server.spec.model, request(tokens), record, timeout_s=timeout_s, ignore_eos=True
    )


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("error_event", "error event in stream: fake engine error"),
        ("truncate", "closed the connection mid-response"),
        ("no_finish_reason", "without a finish_reason"),
        ("short", "4 of 8 tokens despite ignore_eos"),
    ],
)
def test_incomplete_streams_are_failures_with_the_reason(fault, reason, fake_gpu, servers, monkeypatch):
    monkeypatch.setenv("FAKE_STREAM_FAULT", fault)
    cfg = make_cfg()
    record = send(servers(cfg, KVC_A(cfg)))
    assert not record.ok and reason in record.error


@pytest.mark.parametrize("fault", ["keepalive", "trickle"])
def test_request_deadline_is_absolute(fault, fake_gpu, servers, monkeypatch):
    monkeypatch.setenv("FAKE_STREAM_FAULT", fault)
    cfg = make_cfg()
    server = servers(cfg, KVC_A(cfg))
    begin = time.time()
    record = send(server, timeout_s=0.5)
    took = time.time() - begin
    # cut at the deadline: not before it, and long before the stream would end by itself (the trickle's
    # 8 tokens take 7 s; the keep-alives never end)
    assert 0.5 <= took < 5.0
    assert not record.ok and "--request-timeout-s" in record.error


class KeeperAt:
    """A keeper that is running until `ends` is set, then has ended with `code`."""

    def __init__(self, code: int):
        self.code, self.ends = code, threading.Event()

    def poll(self):
        return self.code if self.ends.is_set() else None


def server_kept_by(keeper) -> "rx.RunningServer":
    return rx.RunningServer(
        rx.ServerSpec("A", "m", 1, True),
        proc=keeper,
        cmd=[],
        env_shown={},
        log_path=Path("x"),
        started_at=0.0,
    )


def test_burst_has_an_overall_deadline(monkeypatch):
    released = threading.Event()  # at the end: a stuck thread left behind would hold the worker's exit

    def stuck(url, model, req, record, *args, **kwargs):
        released.wait(3)
        return record

    monkeypatch.setattr(rx, "send_chat", stuck)
    monkeypatch.setattr(rx, "BURST_DEADLINE_SLACK_S", 0.3)
    cfg = rx.resolve_config(rx.Config(preset="smoke", request_timeout_s=0.2))
    server = server_kept_by(KeeperAt(0))
    rows = []
    begin = time.time()
    records = rx.run_burst(
        server,
        [request()] * 3,
        lambda r: rx.RequestRecord("t", "A", "p", 0, 0, 0, 0.0),
        cfg,
        sink=rows.append,
    )
    released.set()
    # the burst's deadline is 0.2 + 0.3 s after its start: it ends then, not when the stuck sends end (3 s)
    assert 0.5 <= time.time() - begin < 2.5
    assert len(records) == len(rows) == 3 and all("burst's deadline" in r.error for r in records)


def test_a_burst_ends_when_its_servers_keeper_has_ended(monkeypatch):
    # vLLM told to stop by its keeper's death keeps its open requests open until they time out: the burst
    # ends once the keeper has gone, with those requests failed for that reason, not at the deadline
    answered, released = threading.Event(), threading.Event()
    keeper = KeeperAt(-signal.SIGKILL)

    def silent(url, model, req, record, *args, **kwargs):
        if req.index == 0:
            answered.set()
            return dataclasses.replace(record, ok=True)
        released.wait(30)  # until the test ends: a thread left asleep would hold the worker's exit
        return record

    monkeypatch.setattr(rx, "send_chat", silent)
    cfg = rx.resolve_config(rx.Config(preset="smoke", request_timeout_s=60))
    requests_ = [dataclasses.replace(request(), index=i) for i in range(3)]
    threading.Thread(target=lambda: answered.wait(5) and keeper.ends.set()).start()
    begin = time.time()
    records = rx.run_burst(
        server_kept_by(keeper), requests_, lambda r: rx.RequestRecord("t", "A", "p", 0, 0, r.index, 0.0), cfg
    )
    released.set()
    assert time.time() - begin < 10, "ended with the keeper, long before the 90 s deadline"
    assert records[0].ok
    assert [r.error for r in records[1:]] == [
        "still open: server A kvcached ended when its keeper was killed (SIGKILL) during the burst"
    ] * 2


def test_an_interrupted_burst_drops_its_queued_requests_quietly(monkeypatch, caplog):
    def stuck(url, model, req, record, *args, **kwargs):
        time.sleep(0.3)
        return record

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rx, "send_chat", stuck)
    monkeypatch.setattr(rx, "burst_threads", lambda requests_: 1)  # the second and third wait in the queue
    monkeypatch.setattr(rx, "await_burst", interrupted)
    cfg = rx.resolve_config(rx.Config(preset="smoke"))
    server = server_kept_by(KeeperAt(0))
    rows = []
    with pytest.raises(KeyboardInterrupt):
        rx.run_burst(
            server,
            [request()] * 3,
            lambda r: rx.RequestRecord("t", "A", "p", 0, 0, 0, 0.0),
            cfg,
            sink=rows.append,
        )
    time.sleep(0.5)  # the one that was sending ends after the stop: it is not recorded either
    assert rows == []
    assert not [r for r in caplog.records if "exception calling callback" in r.getMessage()]


def test_a_server_that_does_not_stream_gets_no_ttft(fake_gpu, servers, monkeypatch):
    monkeypatch.setenv("FAKE_STREAM_FAULT", "no_stream")
    cfg = make_cfg()
    server = servers(cfg, KVC_A(cfg))
    rows = [rx.record_row(send(server)) for _ in range(3)]
    assert all(r["ok"] and r["content_reads"] == 1 for r in rows)
    latency = rx.latency_summary(rows)
    assert latency.ttft_s.p50 is None and "did not stream" in latency.ttft_note
    assert latency.e2e_s.p50 is not None


# 6. A dead server is never reused -----------------------------------------------------------------
def test_dead_server_is_restarted_not_reused(fake_gpu, tmp_path):
    cfg = make_cfg()
    said = []
    rx.STATE.out = said.append
    pool = rx.ServerPool(cfg)
    try:
        (first,) = pool.ensure([KVC_A(cfg)], tmp_path)
        os.kill(first.tree()[1], signal.SIGKILL)  # the API server dies after it was found ready
        assert wait_for(lambda: first.exit_code() is not None, timeout=10)
        (again,) = pool.ensure([KVC_A(cfg)], tmp_path)
        assert again is not first and again.exit_code() is None
        assert any(
            "exited with code 137 (killed by SIGKILL, the kernel's out-of-memory killer?): not reusing it"
            in s
            for s in said
        ), said
    finally:
        rx.stop_servers(pool.shut(), "end of test")


def test_a_server_that_dies_after_the_last_burst_fails_the_experiment(fake_gpu, tmp_path, monkeypatch):
    real = rx.run_measured_step

    def then_die(trial, step, repeat, sink):
        real(trial, step, repeat, sink)
        if step is trial.exp.steps[-1]:  # the API server dies as the last burst ends
            server = trial.servers["A"]
            os.kill(server.tree()[1], signal.SIGKILL)
            assert wait_for(lambda: server.exit_code() is not None, timeout=10)

    monkeypatch.setattr(rx, "run_measured_step", then_die)
    args = in_process_args(tmp_path / "r", *FAST, "--experiments", "1")
    assert rx.main(args, nvml_module=fake_gpu) == 1
    (run,) = (tmp_path / "r").iterdir()
    failed = json.loads((run / "summary.json").read_text())["failed"]["01_kvcached"]
    assert "server A kvcached exited with code 137" in failed and "after the workload" in failed, failed
    assert json.loads((run / "01_kvcached" / "requests.jsonl").read_text().splitlines()[0])["ok"], "kept"


def test_a_server_restarted_in_place_of_a_dead_one_is_a_fresh_start_not_a_reuse(tmp_path):
    def server(slot, log, lines):
        (tmp_path / log).write_text("log line\n" * lines)
        spec = types.SimpleNamespace(key=(slot, "kvcached"), label=f"{slot} kvcached")
        return types.SimpleNamespace(spec=spec, log_path=tmp_path / log, describe=lambda: {"label": log})

    dead, restarted, kept = server("A", "dead.log", 40), server("A", "new.log", 7), server("B", "b.log", 9)
    record = rx.ExperimentRecord("shared_kvcached", "q")
    rx.record_servers(record, [restarted, kept], before=[dead, kept])  # A's key, not A's server
    assert record.reused == ["B kvcached"] and [s["log_lines"] for s in record.servers] == [[0], [9]]


def test_a_burst_on_a_dead_server_fails_the_experiment(fake_gpu, servers):
    cfg = make_cfg()
    server = servers(cfg, KVC_A(cfg))
    os.kill(server.tree()[1], signal.SIGKILL)  # the API server dies after it was found ready
    assert wait_for(lambda: server.exit_code() is not None, timeout=10)
    exp = rx.ExperimentSpec("kvcached", "q", (server.spec,), (rx.Step("burst 1", "A", "main", 0),))
    trial = rx.Trial(cfg, exp, {"main": rx.plan_workload(cfg, 2, "x")}, {"A": server}, None, None, None)
    with pytest.raises(
        rx.ServerError, match=r"exited with code 137 \(killed by SIGKILL, .*\) before 'burst 1'"
    ):
        rx.run_step(trial, exp.steps[0], 0, lambda _: None, lambda _: None)


# 7. The sampler cannot die silently ---------------------------------------------------------------
def test_sampler_survives_a_full_disk_and_counts_it(fake_gpu, tmp_path, monkeypatch):
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    real_open, failing = open, [True]

    def flaky_open(path, *args, **kwargs):
        if failing[0] and str(path).endswith("memory.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", flaky_open)
    sampler.start()
    time.sleep(0.3)
    failing[0] = False
    time.sleep(0.3)
    alive_before_stop = sampler.is_alive()
    sampler.stop()
    assert alive_before_stop
    assert sampler.error_kinds.get("write", 0) >= 5
    assert sum(r["kind"] == "device" for r in rx.read_jsonl(tmp_path / "memory.jsonl")) >= 5, (
        "rows after the disk recovered"
    )


def test_a_gap_in_the_device_series_voids_the_memory_figures(tmp_path):
    exp = tmp_path / "01_kvcached"
    exp.mkdir()
    t0 = 1000.0
    times = [t0 + i * 0.05 for i in range(40)] + [t0 + 10 + i * 0.05 for i in range(40)]  # an 8 s hole
    rx.write_jsonl(exp / "memory.jsonl", [{"kind": "device", "t": t, "used_mib": 1000.0} for t in times])
    rx.write_jsonl(
        exp / "requests.jsonl",
        [
            {
                "ok": True,
                "t_send": t0 + 1,
                "e2e_s": 1.0,
                "ttft_s": 0.1,
                "server": "A",
                "phase": "burst 1",
                "repeat": 0,
            }
        ],
    )
    rx.write_json(
        exp / "experiment.json",
        {
            "name": "kvcached",
            "question": "q",
            "servers": [],
            "sample_interval_s": 0.05,
            "finished": True,
            "marks": {
                "idle_after_load": [t0, t0 + 1],
                "idle_before": [t0 + 1, t0 + 1.5],
                "workload": [t0 + 1.5, t0 + 11],
                "sampling_end": t0 + 12,
            },
        },
    )
    summary = rx.summarize_experiment(rx.load_experiment(exp), 0.05)
    assert not summary.memory_valid and summary.device.peak_mib is None
    assert "not sampled for 8.0 s, past 10 sample intervals (0.5 s; " in summary.problems[0]
    assert summary.problems[0].endswith("rerun with fewer other jobs beside it, or a lower --sample-hz")


def test_a_segment_locked_by_a_stranger_costs_one_sample_not_a_stall(tmp_path, monkeypatch):
    monkeypatch.setattr(rx, "SHM_DIR", tmp_path)
    (tmp_path / "seg").write_bytes(rx.SEGMENT.pack(1, 2, 3))
    with open(tmp_path / "seg", "rb") as other:  # another open file description: flock conflicts
        fcntl.flock(other, fcntl.LOCK_EX)
        begin = time.time()
        with pytest.raises(rx.SegmentError, match="locked"):
            rx.read_segment("seg")
        assert time.time() - begin < 0.5
    assert rx.read_segment("seg")["used_bytes"] == 2


def test_metrics_errors_are_counted_and_missing_gauges_are_not_zero(fake_gpu, tmp_path):
    nvml = rx.load_nvml(fake_gpu)
    nowhere = rx.RunningServer(
        rx.ServerSpec("A", "m", free_port(), False, 0.5),
        proc=subprocess.Popen(["true"]),
        cmd=[],
        env_shown={},
        log_path=tmp_path / "x",
        started_at=0.0,
    )
    nowhere.proc.wait()
    sampler = rx.Sampler(nvml, 0, [nowhere], tmp_path / "memory.jsonl", sample_hz=20, process_sample_hz=10)
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    assert sampler.error_kinds.get("metrics", 0) >= 2
    exp = tmp_path / "01_static"
    exp.mkdir()
    rx.write_jsonl(exp / "memory.jsonl", [{"kind": "metrics", "t": 1.0, "server": "A", "running": 3.0}])
    rx.write_json(
        exp / "experiment.json",
        {
            "name": "static",
            "question": "q",
            "marks": {},
            "servers": [{"label": "A static", "spec": {"name": "A", "model": "m"}, "startup_s": 1.0}],
        },
    )
    vllm = rx.summarize_experiment(rx.load_experiment(exp), 0.05).servers["A"].vllm
    assert vllm.max_running == 3.0 and vllm.max_waiting is None


def test_peaks_of_a_server_whose_requests_ran_between_two_reads_are_void_and_say_why(tmp_path):
    """A burst shorter than the reads' interval can run between two reads of kvcached's segment and
    vLLM's /metrics: the largest read then says 0 requests ran (seen on an H100 under --preset smoke).
    A read during a sleeping server's wake-up, before its requests ran, reads nothing either."""
    exp = tmp_path / "01_shared_kvcached"
    exp.mkdir()
    rows = []
    for tick in range(10):  # each server read at 2 Hz; only B's requests run through a read (at 102.5)
        t = 100 + tick / 2
        for slot in "AB":
            busy = slot == "B" and t == 102.5
            rows += [
                {"kind": "process", "t": t, "server": slot, "used_mib": 1000.0},
                {"kind": "kvcached", "t": t, "server": slot, "total_bytes": 8 * rx.MIB}
                | {"used_bytes": (5 if busy else 0) * rx.MIB, "prealloc_bytes": rx.MIB},
                {"kind": "metrics", "t": t, "server": slot, "running": 3.0 * busy, "waiting": 0.0}
                | {"preemptions": 0.0},
            ]
    rx.write_jsonl(exp / "memory.jsonl", rows)
    # (phase, slot, mark start, mark end, first token after, request ends after): A's second burst's mark
    # holds the read at 103.0, during its wake-up; its request's first token came at 103.1
    bursts = [("A 1", "A", 101.1, 101.3, 0.05, 0.2), ("B 1", "B", 102.0, 102.6, 0.1, 0.6)]
    bursts += [("A 2", "A", 102.9, 103.3, 0.2, 0.4)]
    requests = [
        dict(server=s, phase=p, repeat=0, burst=0, index=0, ok=True, t_send=b, ttft_s=ttft, e2e_s=e2e)
        for p, s, b, _, ttft, e2e in bursts
    ]
    rx.write_jsonl(exp / "requests.jsonl", requests)
    rx.write_json(
        exp / "experiment.json",
        {
            "name": "shared_kvcached",
            "question": "q",
            "servers": [
                {"label": f"{slot} kvcached", "spec": {"name": slot, "model": "m"}, "startup_s": 1.0}
                for slot in "AB"
            ],
            "marks": {
                "bursts": [dict(phase=p, server=s, repeat=0, start=b, end=e) for p, s, b, e, *_ in bursts]
            },
        },
    )
    summary = rx.summarize_experiment(rx.load_experiment(exp), 0.05)
    a, b = summary.servers["A"], summary.servers["B"]
    assert (a.vllm.max_running, a.vllm.max_waiting, a.vllm.preemptions) == (None, None, 0.0)
    assert (a.kvcached.peak_used_mib, a.kvcached.limit_mib) == (None, 8.0)
    assert (a.memory.peak_mib, b.memory.peak_mib) == (None, 1000.0)
    assert (b.vllm.max_running, b.kvcached.peak_used_mib) == (3.0, 5.0), "a burst read once keeps its peaks"
    assert summary.problems == [
        "A's peaks from its process tree (NVML), kvcached's segment, vLLM's /metrics n/a: no read fell while "
        "its requests ran in 2 of its 2 bursts (its shortest burst lasted 0.20 s and each server was read "
        "every 0.50 s: raise --process-sample-hz to 40 or more (about 8 samples a burst) or lengthen the "
        "bursts (--max-tokens))"
    ]
    table = "\n".join(rx.per_model_table({"shared_kvcached": summary}))
    assert "| shared_kvcached | A: m | n/a | n/a | n/a / 8 | n/a / n/a | 0 |" in table
    assert "| shared_kvcached | B: m | n/a | 1,000 | 5 / 8 | 3 / 0 | 0 |" in table
    # without A's second burst, its first is its one burst
    record = json.loads((exp / "experiment.json").read_text())
    record["marks"]["bursts"] = record["marks"]["bursts"][:2]
    rx.write_json(exp / "experiment.json", record)
    rx.write_jsonl(exp / "requests.jsonl", requests[:2])
    (problem,) = rx.summarize_experiment(rx.load_experiment(exp), 0.05).problems
    assert "no read fell while its requests ran in its one burst (its shortest burst" in problem


# 8. Files are written atomically and read forgivingly ---------------------------------------------
def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "experiment.json"
    rx.write_json(target, {"v": 1})
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        rx.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["experiment.json"]


def test_report_of_a_killed_run_names_what_it_cannot_read(tmp_path):
    run = tmp_path / "20260101T000000Z_run"
    (run / "01_kvcached").mkdir(parents=True)
    (run / "config.json").write_text("")  # torn by a full disk
    (run / "01_kvcached" / "experiment.json").write_text("")
    rx.write_jsonl(
        run / "01_kvcached" / "memory.jsonl",
        [{"kind": "device", "t": 1 + i / 20, "used_mib": 900.0 + i} for i in range(40)],
    )
    proc = subprocess.run(
        [sys.executable, str(rx.Path(rx.__file__)), "--report", str(run), "--no-plots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    md = (run / "summary.md").read_text()
    assert "config.json unreadable" in md and "experiment.json unreadable" in md
    summary = json.loads((run / "summary.json").read_text())["experiments"]["kvcached"]
    assert summary["device"]["peak_mib"] == 939.0, "the raw samples are still reported"


def test_an_experiment_stopped_before_its_first_request_reports_no_workload_peak(tmp_path):
    """experiment.json was saved after the idle window (no burst yet), then the run died in its warm-up:
    the warm-up's 30 GB are not the workload's peak. A request already sent starts the workload."""
    exp = tmp_path / "01_kvcached"
    exp.mkdir()
    record = rx.ExperimentRecord("kvcached", "q")
    record.marks.idle_after_load = (1.0, 2.0)
    rx.write_json(exp / "experiment.json", record)
    levels = [(1 + i / 10, 30000.0 if 2.5 <= 1 + i / 10 < 4 else 1000.0) for i in range(50)]
    rx.write_jsonl(exp / "memory.jsonl", [{"kind": "device", "t": t, "used_mib": mib} for t, mib in levels])
    summary = rx.summarize_experiment(rx.load_experiment(exp), 0.05)
    assert summary.device.peak_mib is None and summary.memory_cost is None
    rx.write_jsonl(
        exp / "requests.jsonl", [{"server": "A", "phase": "burst 1", "repeat": 0, "burst": 0, "t_send": 4.5}]
    )
    assert rx.load_experiment(exp).record.marks.workload == (4.5, 5.9)


def test_memory_still_falling_after_the_warm_up_is_named_as_a_problem(tmp_path):
    exp = tmp_path / "01_kvcached"
    exp.mkdir()
    record = rx.ExperimentRecord("kvcached", "q", finished=True, after_warmup="timeout")
    rx.write_json(exp / "experiment.json", record)
    rx.write_jsonl(
        exp / "memory.jsonl", [{"kind": "device", "t": 1 + i / 10, "used_mib": 900.0} for i in range(30)]
    )
    (problem,) = rx.summarize_experiment(rx.load_experiment(exp), 0.05).problems
    assert problem.startswith("memory had not settled --release-timeout-s after the warm-up")
    assert "after_warmup" not in json.dumps(rx.to_json(rx.ExperimentRecord("kvcached", "q"))), (
        "omitted when None"
    )


@pytest.mark.parametrize("target", ["not_a_run", "missing"])
def test_report_of_something_else_is_one_clear_line(tmp_path, target):
    folder = tmp_path / target
    if target == "not_a_run":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    proc = subprocess.run(
        [sys.executable, str(rx.Path(rx.__file__)), "--report", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "not a run folder" in proc.stderr or "not a folder" in proc.stderr


# 9. No secret is ever written ---------------------------------------------------------------------
def test_no_secret_reaches_the_run_folder_or_stdout(secrets_and_length_mix_run):
    key, token = SECRET_KEY, SECRET_TOKEN
    proc, tmp_path, run = secrets_and_length_mix_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())["experiments"]["kvcached"]
    assert summary["latency"]["ok"] == summary["latency"]["requests"] > 0, "the key reached the server"
    found = subprocess.run(
        ["grep", "-rlaE", f"{key}|{token}|s3cr3t-value|{KVCACHED_ENV_SECRET}", str(tmp_path)],
        capture_output=True,
        text=True,
    ).stdout
    assert found == ""
    assert key not in proc.stdout + proc.stderr and token not in proc.stdout + proc.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["api_key"] == "***" and "--api-key '***'" in config["command"]


def test_redaction_rules():
    assert rx.redact_argv(["--api-key", "k", "--api-key=k2", "--max-num-batched-tokens", "8"]) == [
        "--api-key",
        "***",
        "--api-key=***",
        "--max-num-batched-tokens",
        "8",
    ]
    env = rx.redact_env(
        {
            "VLLM_API_KEY": "a",
            "HF_TOKEN": "b",
            "AWS_SECRET_ACCESS_KEY": "c",
            "TOKENIZERS_PARALLELISM": "false",
            "KVCACHED_IPC_NAME": "n",
        }
    )
    assert env == {
        "VLLM_API_KEY": "***",
        "HF_TOKEN": "***",
        "AWS_SECRET_ACCESS_KEY": "***",
        "TOKENIZERS_PARALLELISM": "false",
        "KVCACHED_IPC_NAME": "n",
    }


# 10. /dev/shm is shared and hostile ---------------------------------------------------------------
def test_planted_symlink_is_never_followed_or_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(rx, "SHM_DIR", tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious contents of someone else's file")
    (tmp_path / "seg").symlink_to(victim)
    with pytest.raises(OSError):
        rx.write_segment_limit("seg", 1)
    with pytest.raises(OSError):
        rx.read_segment("seg")
    said = []
    rx.STATE.out = said.append
    assert not rx.remove_segment("seg")
    assert victim.read_bytes() == b"precious contents of someone else's file"
    assert (tmp_path / "seg").is_symlink() and "a symlink" in said[0]


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another uid needs root")
def test_a_segment_of_another_user_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(rx, "SHM_DIR", tmp_path)
    segment = tmp_path / "seg"
    segment.write_bytes(rx.SEGMENT.pack(1, 2, 3))
    os.chown(segment, 12345, 12345)
    with pytest.raises(rx.SegmentError, match="not our kvcached segment"):
        rx.read_segment("seg")
    said = []
    rx.STATE.out = said.append
    assert not rx.remove_segment("seg")
    assert segment.exists() and "owned by uid 12345" in said[0]


def test_segment_names_are_unique_to_the_harness_process():
    spec = rx.ServerSpec("A", "m", 8001, kvcached=True)
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import run_experiments as rx; print(rx.ServerSpec('A', 'm', 8001, kvcached=True).ipc_name)",
        ],
        cwd=str(rx.Path(rx.__file__).parent),
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert spec.ipc_name.startswith("kvcached_bench_") and other.startswith("kvcached_bench_")
    assert spec.ipc_name != other


# 11. Honest reporting of partial runs -------------------------------------------------------------
@background("interrupted_scenario", weight=3)
def interrupted_scenario_job(base):
    def scenario():
        (base / "gpu").mkdir()
        # no --ignore-eos: answers end at different lengths, so a burst finishes request by request
        env = fake_env(base / "gpu", FAKE_ITL_S="0.05")
        args = script_args(
            base / "results", "--experiments", "1", "--no-warmup", "--burst-size", "16", "--max-tokens", "64"
        )
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            finishing = wait_for(lambda: list((base / "results").glob("*/01_*/requests.jsonl")), timeout=60)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return {"finishing": finishing, "rc": proc.returncode, "out": out, "results": base / "results"}

    return scenario


@pytest.fixture
def interrupted_scenario(background_runs):
    return background_runs.result("interrupted_scenario")


def test_interrupted_run_keeps_the_finished_requests_and_says_so(interrupted_scenario):
    run = interrupted_scenario
    assert run["finishing"], run["out"][-2000:]
    assert run["rc"] == 130, run["out"][-2000:]
    (interrupted,) = run["results"].iterdir()
    rows = rx.read_jsonl(interrupted / "01_kvcached" / "requests.jsonl")
    assert 1 <= len(rows) < 16 and all(r["ok"] for r in rows)
    md = (interrupted / "summary.md").read_text()
    assert "This run was interrupted" in md and "incomplete" in md


@background("all_failed_run", weight=3.5)
def all_failed_cmd(base):
    (base / "gpu").mkdir()
    return dict(
        args=script_args(base / "results", "--experiments", "1", "--bursts", "1"),
        env=fake_env(base / "gpu", FAKE_STREAM_FAULT="error_event"),
        timeout=120,
    )


@pytest.fixture
def all_failed_run(background_runs):
    proc, base = background_runs.result("all_failed_run")
    runs = sorted((base / "results").iterdir()) if (base / "results").exists() else []
    return proc, (runs[-1] if runs else None)


def test_experiment_where_every_request_failed_is_void_and_fails_the_run(all_failed_run):
    proc, run = all_failed_run
    assert proc.returncode == 1, proc.stdout[-2000:]
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert headline["invalid"] == ["kvcached"] and headline["experiments"]["kvcached"]["peak_mib"] is None
    md = (run / "summary.md").read_text()
    assert "memory figures void" in md and "no request succeeded" in md
    top = md.split("\n\n")[1]  # said at the top, not only in the problems further down
    assert top.startswith("> **No request succeeded in** kvcached (8 of 8 failed)"), top


def test_a_server_that_came_up_before_its_partner_failed_counts_as_a_paid_start_up(
    fake_gpu, tmp_path, monkeypatch
):
    """shared_static starts A, then B cannot start: A's start-up was paid all the same, and is counted."""
    real = rx.start_checks

    def b_refused(cfg, spec):
        if spec.name == "B":
            raise rx.ServerError("port taken (by the test)")
        return real(cfg, spec)

    monkeypatch.setattr(rx, "start_checks", b_refused)
    args = in_process_args(tmp_path / "r", "--preset", "smoke", "--no-plots", "--experiments", "4")
    assert rx.main(args, nvml_module=fake_gpu) == 1
    (run,) = (tmp_path / "r").iterdir()
    record = json.loads((run / "01_shared_static" / "experiment.json").read_text())
    assert [s["spec"]["name"] for s in record["servers"]] == ["A"] and record["servers"][0]["ready_at"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == {"01_shared_static": "ServerError: port taken (by the test)"}
    assert summary["server_starts"]["started"] == 1 and summary["timing"]["startups_s"] > 0
    assert "vLLM start-ups: 1 paid" in (run / "summary.md").read_text()


# 12. Bad values are rejected up front, naming the flag --------------------------------------------
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--overload-budget-gib", "inf"], "--overload-budget-gib"),
        (["--release-timeout-s", "inf"], "--release-timeout-s"),
        (["--sample-hz", "nan"], "--sample-hz"),
        (["--server-cmd", "python 'unbalanced"], "--server-cmd"),
        (["--extra-server-args", "--x 'y"], "--extra-server-args"),
        # the harness sets these per server and per arm; vLLM would take the last one given
        (["--extra-server-args", "--max-num-seqs 64 --gpu-memory-utilization 0.9"], "--extra-server-args"),
        (["--extra-server-args=--port=9000"], "--extra-server-args"),
        (
            ["--max-model-len", "64", "--experiments", "1"],
            "--max-model-len",
        ),  # not the length mix never given
        # millions of requests, a prompt each, were planned (a MemoryError) before any check refused them
        (["--burst-size", "3000000"], "--burst-size"),
        (["--arrivals", "ramp", "--peak-rates", "2000000", "--ramp-step", "2000000"], "--peak-rates"),
        (["--extra-server-args", "--gpu_memory_utilization 0.9"], "--extra-server-args"),  # vLLM reads _ as -
        (["--extra-server-args=--api_key=sk-x"], "--extra-server-args"),
        # the arm's own switch, and the segment name that keeps each server's (and strangers') apart
        (["--kvcached-env", "ENABLE_KVCACHED=false"], "--kvcached-env"),
        (["--kvcached-env", "KVCACHED_LOG_LEVEL=INFO,KVCACHED_IPC_NAME=mine"], "--kvcached-env"),
        # the share of the card kvcached may map: nan was a traceback in --check, abc read as 0.95
        (["--kvcached-env", "KVCACHED_GPU_UTILIZATION=nan"], "--kvcached-env"),
        (["--kvcached-env", "KVCACHED_GPU_UTILIZATION=abc"], "--kvcached-env"),
        (["--kvcached-env", "KVCACHED_GPU_UTILIZATION=1.5"], "--kvcached-env"),
        (["--models", "a,b,c", "--pair-utilization-b", "0.3"], "--pair-utilization-b"),  # no pair: no B share
        (
            ["--arrivals", "gamma", "--rate", "2", "--burstiness", "1e-300"],
            "--burstiness",
        ),  # gaps of 0: no end
        (["--arrivals", "poisson", "--rate", "1e9"], "--duration-s"),  # billions of planned requests
        # each took minutes to plan, or overflowed a deadline only once the servers were up
        (["--bursts", "99999999999999999999"], "--bursts"),
        (["--bursts", "10000", "--burst-size", "100000"], "--bursts"),
        (["--arrivals", "poisson", "--rate", "1", "--bursts", "10000000"], "--bursts"),
        (["--arrivals", "poisson", "--rates", ",".join(["1"] * 20_000)], "--rates"),
        # each model sends its rate in every one of the --bursts windows: 2 x 1,000/s x 30 s x 20
        (["--arrivals", "poisson", "--rates-per-model", "1000,1000", "--bursts", "20"], "--duration-s"),
        (
            [
                "--arrivals",
                "poisson",
                "--rates",
                "3000,3000,3000,3000,3000,3000,3000,3000,3000,3000,3000,3000",
            ],
            "--duration-s",
        ),
        # ramp_length overflowed in --check; -1, how auto is held, was taken for auto
        (["--arrivals", "ramp", "--peak-rates", "10", "--ramp-step", "1e-320"], "--ramp-step"),
        (["--arrivals", "ramp", "--peak-rates", "1e300", "--ramp-step", "1e-6"], "--peak-rates"),
        (["--max-model-len", "-1", "--arrivals", "trace", "--trace", "t.csv"], "--max-model-len"),
        (["--request-timeout-s", "1e300"], "--request-timeout-s"),
        (["--overload-budget-gib", "1e308"], "--overload-budget-gib"),
        (["--sample-hz", "1e9"], "--sample-hz"),
        (["--repeats", "99999999999999999999"], "--repeats"),
        # the overload bursts' long requests need a prompt: 400 leaves 32 tokens beside the preset's output
        (["--preset", "smoke", "--max-model-len", "400", "--experiments", "5"], "--max-model-len"),
        # the prompt is cut to leave the length mix's longest output room: 84 tokens, below the prefix
        (
            ["--output-tokens-dist", "uniform:1-1900", "--shared-prefix-tokens", "700", "--prefix-caching"],
            "--shared-prefix-tokens",
        ),
        # the overload bursts' prompts (448 tokens within 1,024) are shorter than the main plan's (768)
        (
            [
                "--max-model-len",
                "1024",
                "--shared-prefix-tokens",
                "760",
                "--prefix-caching",
                "--experiments",
                "5",
            ],
            "--shared-prefix-tokens",
        ),
        # 59 output tokens and the margin leave -3 tokens of prompt: the bare seed prompts went out instead
        (["--max-model-len", "120", "--max-tokens", "59", "--experiments", "1,2"], "--max-model-len"),
        (
            [
                "--max-model-len",
                "200",
                "--max-tokens",
                "99",
                "--prompt-tokens",
                "40",
                "--experiments",
                "seed",
            ],
            "--max-model-len",
        ),
        (["--tag", "x" * 260], "--tag"),  # File name too long, after the preflight
        (["--server-cmd", "/nonexistent/python -m vllm"], "--server-cmd"),  # each experiment failed instead
        (["--extra-server-args", "--served-model-name mine"], "--extra-server-args"),  # every request a 404
        (["--extra-server-args", "--api-key abcdef123"], "--extra-server-args"),  # every request a 401
        (["--settle-s", "0"], "--settle-s"),
        (["--max-burst-size", "0"], "--max-burst-size"),  # no burst could be sized
        (["--model-a", ""], "--model-a"),
        (["--idle-window-s", "0.5", "--sample-hz", "4"], "--idle-window-s"),  # 2 samples: no median to trust
        (["--idle-window-s", "0.5"], "--idle-window-s"),  # at 2 per-process samples a second: often none
        (["--model-a", "/no/such/dir"], "--model-a"),
        (["--tag", "a/b"], "--tag"),
    ],
)
def test_bad_values_name_the_flag_before_anything_launches(argv, flag, tmp_path, capsys):
    rc = rx.main(argv + ["--results-dir", str(tmp_path / "results")])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"error: {flag}:")
    assert not (tmp_path / "results").exists()


def test_report_refuses_a_flag_it_would_ignore(tmp_path, capsys):
    # summaries are rebuilt with the SLOs the run had: a new --slo-ttft-ms would change nothing
    assert rx.main(["--report", str(tmp_path), "--slo-ttft-ms", "500"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("error: --slo-ttft-ms: --report uses the run's own settings"), said


def test_results_dir_that_is_a_file_or_unwritable_is_refused(tmp_path, capsys, fake_gpu):
    afile = tmp_path / "file"
    afile.write_text("")
    for target in (afile, afile / "below"):
        assert rx.main(["--results-dir", str(target), "--server-cmd", "true"], nvml_module=fake_gpu) == 2
        assert "--results-dir" in capsys.readouterr().err


def test_gpu_index_out_of_range_says_how_many_there_are(tmp_path, capsys, fake_gpu):
    rc = rx.main(
        ["--gpu-index", "7", "--server-cmd", "true", "--results-dir", str(tmp_path / "r")],
        nvml_module=fake_gpu,
    )
    assert rc == 2
    said = capsys.readouterr().err
    assert "GPU index 7 out of range: this machine has 1 GPU" in said
    assert "nvidia-smi -L" in said and "pip install nvidia-ml-py" not in said, "NVML works: pick a card"
    assert not (tmp_path / "r").exists(), "no run folder, and not the results folder the check made"


def test_the_results_check_leaves_no_folder_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    check = rx.check_results(str(tmp_path / "kept" / "new" / "results"))
    assert check.ok and check.detail.endswith("/new/results/ writable")
    assert list(tmp_path.rglob("*")) == [tmp_path / "kept"], "a folder that was there stays"


def test_open_files_limit_is_raised_or_named(monkeypatch):
    calls = []
    monkeypatch.setattr(rx.resource, "getrlimit", lambda _: (256, 4096))
    monkeypatch.setattr(rx.resource, "setrlimit", lambda _, value: calls.append(value))
    rx.ensure_open_files(1000)
    assert calls == [(1128, 4096)]
    monkeypatch.setattr(rx.resource, "getrlimit", lambda _: (256, 512))
    with pytest.raises(rx.ConfigError, match=r"ulimit -n 1128.*--burst-size.*--peak-rates"):
        rx.ensure_open_files(1000)


def test_open_files_are_counted_as_the_client_opens_them():
    many = rx.OPEN_LOOP_THREADS + 100
    closed = [rx.PlannedRequest(0, i, "p", 8, 0.7) for i in range(many)]
    open_loop = [rx.PlannedRequest(0, i, "p", 8, 0.7, offset_s=0.01 * (i + 1)) for i in range(many)]
    assert rx.burst_threads(closed) == many, "a closed burst sends every request at once"
    assert rx.burst_threads(open_loop) == rx.OPEN_LOOP_THREADS
    cfg = rx.resolve_config(rx.Config(preset="smoke", models="m1,m2,m3"))
    plans = {"main": rx.plan_workload(cfg, 40, "t", bursts=2), "warm": rx.plan_workload(cfg, 7, "t")}
    shared = rx.parse_experiments("3")
    assert rx.most_sockets(plans, cfg, shared) == 3 * 40, "every model's largest burst at once"
    assert rx.most_sockets(plans, cfg, rx.parse_experiments("1,2")) == 40, "one model: its sockets only"


# 13. A signal at an unlucky moment -----------------------------------------------------------------
def test_an_interrupt_that_surfaces_as_another_error_ends_the_run(fake_gpu, tmp_path, monkeypatch):
    started = []

    def interrupted_inside_a_lock(cfg, exp, *args):
        started.append(exp.name)
        try:
            raise KeyboardInterrupt("signal 15")
        except KeyboardInterrupt:  # as threading's Condition.wait can leave it: RuntimeError, and the signal
            threading.Lock().release()

    monkeypatch.setattr(rx, "run_experiment", interrupted_inside_a_lock)
    args = in_process_args(tmp_path / "r", "--experiments", "1,2", "--no-plots")
    assert rx.main(args, nvml_module=fake_gpu) == 130
    assert started == ["kvcached"], "the next experiment never started"
    (run,) = (tmp_path / "r").iterdir()
    assert not list(run.glob("*/error.json")), "an interrupted run, not a failed experiment"


def test_an_interrupt_that_surfaces_as_another_error_before_the_experiments_ends_the_run(
    fake_gpu, tmp_path, monkeypatch
):
    def interrupted_inside_a_lock(run, pool):  # as while waiting for vLLM's import check
        try:
            raise KeyboardInterrupt("signal 2")
        except KeyboardInterrupt:
            threading.Lock().release()

    monkeypatch.setattr(rx, "import_first_servers", interrupted_inside_a_lock)
    args = in_process_args(tmp_path / "r", "--experiments", "1", "--no-plots")
    assert rx.main(args, nvml_module=fake_gpu) == 130
    (run,) = (tmp_path / "r").iterdir()
    assert json.loads((run / "config.json").read_text())["interrupted"] and (run / "summary.md").exists()


def test_a_second_interrupt_before_the_stop_is_under_way_still_stops_every_server(
    fake_gpu, tmp_path, monkeypatch
):
    real_stop, stops = rx.stop_servers, []

    def interrupted_first(servers, why, grace_s=None):  # as a notebook's second press, before any order
        stops.append((why, len(servers), rx.STATE.hurry.is_set()))
        if why == "end of run":
            raise KeyboardInterrupt
        return real_stop(servers, why, grace_s)

    monkeypatch.setattr(rx, "stop_servers", interrupted_first)
    args = in_process_args(tmp_path / "r", "--experiments", "3", *FAST, "--bursts", "1", "--no-warmup")
    assert rx.main(args, nvml_module=fake_gpu) == 130
    assert [s for s in stops if s[1]] == [("end of run", 2, False), ("interrupted again", 2, True)]
    assert not list(Path(os.environ["FAKE_GPU_DIR"]).glob("*.json")), "both servers stopped"


def test_an_interrupt_while_the_report_is_built_ends_the_run_with_130_and_says_how_to_rebuild(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    def interrupted(run_dir, draw_plots):
        raise KeyboardInterrupt

    monkeypatch.setattr(rx, "build_report", interrupted)
    args = in_process_args(tmp_path / "r", "--experiments", "1", *FAST, "--bursts", "1", "--no-warmup")
    assert rx.main(args, nvml_module=fake_gpu) == 130
    (run,) = (tmp_path / "r").iterdir()
    assert f"building the report was interrupted; raw results are in {run}" in capsys.readouterr().err
    assert (run / "01_kvcached" / "requests.jsonl").exists()


def test_ctrl_c_during_the_preflight_exits_with_130_and_leaves_no_run(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rx, "preflight", interrupted)
    assert rx.main(in_process_args(tmp_path / "r", "--experiments", "1"), nvml_module=fake_gpu) == 130
    assert "interrupted before anything was measured" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())


def test_a_sighup_after_the_terminal_is_gone_still_ends_the_run_as_interrupted(tmp_path):
    (tmp_path / "gpu").mkdir()
    args = script_args(tmp_path / "results", "--experiments", "1", "--bursts", "50", "--no-warmup")
    read_end, write_end = os.pipe()
    with open(tmp_path / "err.txt", "w") as err:
        # buffered, as a user's run is: what the buffer holds at exit must not fail the exit code either
        env = {k: v for k, v in fake_env(tmp_path / "gpu").items() if k != "PYTHONUNBUFFERED"}
        proc = subprocess.Popen(args, env=env, stdout=write_end, stderr=err)
    os.close(write_end)
    try:
        os.set_blocking(read_end, False)

        seen = bytearray()

        def bursting():
            with contextlib.suppress(BlockingIOError):
                seen.extend(os.read(read_end, 1 << 16))
            return list((tmp_path / "results").glob("*/01_*/requests.jsonl"))

        assert wait_for(bursting, timeout=60)
        assert wait_for(lambda: bursting() and b"burst 1:" in seen, timeout=20), "each line shows at once"
        os.close(read_end)  # the terminal (or `| tee`) is gone: every later line fails to be written
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=60) == 130, (tmp_path / "err.txt").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = (tmp_path / "results").iterdir()
    assert json.loads((run / "config.json").read_text())["interrupted"] and (run / "summary.md").exists()
    assert not list((tmp_path / "gpu").glob("*.json")), "no server left"


def test_a_secret_in_an_inline_env_of_the_server_command_is_never_written(tmp_path):
    rx.register_secrets(rx.Config(server_cmd="bash -c 'HF_TOKEN=hf_inside_one_arg9 vllm serve'"))
    assert rx.scrub("hf_inside_one_arg9") == rx.REDACTED, "a secret inside one argument"
    assert rx.redact_argv(["--env=HF_TOKEN=x1", "-eHF_TOKEN=x2"]) == ["--env=HF_TOKEN=***", "-eHF_TOKEN=***"]
    cmd = "env HF_TOKEN=hf_INLINE_secret77 docker run -e AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI vllm"
    assert rx.redact_argv(shlex.split(cmd)) == [
        "env",
        "HF_TOKEN=***",
        "docker",
        "run",
        "-e",
        "AWS_SECRET_ACCESS_KEY=***",
        "vllm",
    ]
    rx.register_secrets(rx.Config(server_cmd=cmd))
    assert "hf_INLINE_secret77" not in rx.scrub("token hf_INLINE_secret77 and wJalrXUtnFEMI")
    assert "wJalrXUtnFEMI" not in rx.scrub("wJalrXUtnFEMI")


def test_a_secret_flag_inside_one_shell_string_and_short_secrets_are_hidden_where_commands_are_written(
    capsys,
):
    login = "bash -c 'hf auth login --token hf_LONGSECRET_abc; exec vllm serve \"$@\"' x"
    rx.register_secrets(rx.Config(server_cmd=login))
    assert rx.scrub("log: hf_LONGSECRET_abc") == "log: ***", "inside one argument, as --flag VALUE"
    shown = rx.redact_command(login)
    assert "hf_LONGSECRET_abc" not in shown and shlex.split(shlex.split(shown)[2])[3:5] == ["--token", "***"]
    spaced = rx.Config(server_cmd="vllm serve --api-key 'long pass phrase' --hf-token='tok en-secret-123'")
    rx.register_secrets(spaced)
    assert rx.scrub("--api-key long pass phrase, token tok en-secret-123") == "--api-key ***, token ***"
    short = "vllm serve --api-key k3y12"  # too short for scrub's search of free text, never for a command
    assert rx.redact_command(short) == "vllm serve --api-key '***'"
    assert rx.redact_command("vllm serve --port 8001") == "vllm serve --port 8001"
    assert rx.redact_env_pairs("A=1,HF_TOKEN=abc") == "A=1,HF_TOKEN=***"
    assert rx.redact_env_pairs("A=1, B=2") == "A=1, B=2", "as given where nothing is hidden"
    assert rx.main(["--server-cmd", "HF_TOKEN=hf_SECRET_in_cmd_123 vllm serve", "--check"]) == 2
    err = capsys.readouterr().err
    assert "hf_SECRET_in_cmd_123" not in err and "HF_TOKEN=*** is not found" in err
    assert "NAME=value before a command is shell syntax" in err


@pytest.mark.parametrize("key", ["sk-ключ-123456", "sk-with\nnewline", "sk with space"])
def test_an_api_key_no_http_header_can_carry_is_refused_without_echoing_it(key, capsys):
    assert rx.main(["--api-key", key, "--check"]) == 2
    err = capsys.readouterr().err
    assert "--api-key: must be printable ASCII without spaces" in err and key not in err


def test_a_server_script_that_is_not_there_is_refused_before_anything_launches(tmp_path, capsys):
    missing = tmp_path / "no_server_here.py"
    assert rx.main(["--server-cmd", f"python3 -S {missing}", "--check"]) == 2
    assert f"--server-cmd: runs {missing}, which is not a file" in capsys.readouterr().err
    assert rx.python_script(["python3", "-m", "vllm.entrypoints.openai.api_server", "--x", "cfg.py"]) == ""
    assert rx.python_script(["/venv/bin/python3.12", "-u", "serve.py", "a.py"]) == "serve.py"
    assert rx.python_script(["vllm", "serve", "x.py"]) == "", "not a Python: its arguments are its own"
    assert rx.python_script(["python3", "-X", "dev", "serve", "--chat-template", "t.py"]) == "serve", (
        "a script named without .py; -X's value is no script"
    )


def test_a_mistyped_secret_flag_is_refused_without_echoing_its_value_and_abbreviations_are_refused(capsys):
    assert rx.main(["--hf-token", "hf_LEAKED_value123"]) == 2
    err = capsys.readouterr().err
    assert "--hf-token" in err and "hf_LEAKED_value123" not in err
    assert rx.main(["--api-k", "k3y9abcdef"]) == 2, "an abbreviation of --api-key is not taken as it"
    assert "k3y9abcdef" not in capsys.readouterr().err, "nor is its value echoed"


@pytest.mark.parametrize("argv", [["--report", ""], ["--report="], ["--results-dir", ""]])
def test_an_empty_report_or_results_folder_is_refused_before_anything_starts(argv, capsys):
    """`--report "$RUN"` with RUN unset started the whole default run."""
    assert rx.main(argv) == 2
    assert "empty (an unset shell variable?)" in capsys.readouterr().err


def test_report_refuses_a_model_folder_and_leaves_its_files_alone(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (tmp_path / "summary.md").write_text("my notes")
    assert rx.main(["--report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert (tmp_path / "summary.md").read_text() == "my notes" and not (tmp_path / "summary.json").exists()


def test_lane_of_by_hand_is_refused_and_hidden_from_help(monkeypatch, capsys):
    """By hand it ran experiments again into a finished run's folder, mixing two runs' requests."""
    monkeypatch.delenv(rx.LANE_PARENT, raising=False)
    with pytest.raises(rx.ConfigError, match="--lane-of: set by --gpus"):
        rx.check_lane_starter()
    assert rx.main(["--help"]) == 0
    assert "--lane-of" not in capsys.readouterr().out


def test_run_in_jupyter_takes_its_own_flags_and_a_pasted_cell_notebook_args(monkeypatch):
    monkeypatch.setattr(rx.sys, "argv", [rx.__file__, "--preset", "smoke"])
    assert rx.notebook_argv() == ["--preset", "smoke"], "%run run_experiments.py --preset smoke"
    monkeypatch.setattr(rx.sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])
    assert rx.notebook_argv() == rx.NOTEBOOK_ARGS, "split by main(), which says where quotes do not close"


def test_flags_whose_quotes_do_not_close_are_refused_before_anything_launches(capsys, monkeypatch):
    assert rx.main('--preset smoke --tag "x', out=lambda _: None) == 2
    assert "the flags: no closing quotation in '--preset smoke --tag \"x'; check its quotes" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(rx, "NOTEBOOK_ARGS", "--tag 'x")
    monkeypatch.setattr(rx, "running_in_notebook", lambda: True)
    assert rx.main(out=lambda _: None) == 2
    assert "NOTEBOOK_ARGS: no closing quotation" in capsys.readouterr().err


def test_a_models_malformed_config_json_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2,')
    assert rx.main(["--check", "--experiments", "1", "--model-a", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json unreadable (JSONDecodeError" in err and "--model-a" in err, "what to change: the flag"
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(rx.ConfigError, match="holds no JSON object"):
        rx.load_model_config(str(tmp_path))


def test_a_flag_the_chosen_arrivals_do_not_read_is_named_as_ignored(said):
    rx.config_from_args(["--arrivals", "poisson", "--rate", "2", "--burst-size", "8", "--trace-speedup", "4"])
    assert said == [
        "note: --trace-speedup applies to --arrivals trace: it is ignored",
        "note: --burst-size applies to closed bursts (a window sends what arrives in it): it is ignored",
    ]


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--experimnts", "1"], "did you mean --experiments?"),
        (["--experiments", "2", "1"], "unrecognized arguments: 1; see --help"),
        (["--warmup", "false"], "a switch takes no value: e.g. --warmup or --no-warmup"),
        (["--extra-server-args", "--enforce-eager"], "a value that starts with '-' goes after '='"),
    ],
)
def test_a_mistyped_flag_says_what_was_meant(argv, hint, capsys):
    assert rx.main(argv) == 2
    assert hint in capsys.readouterr().err


def test_a_dead_servers_tail_leaves_out_the_harness_polling_and_names_a_kill(tmp_path):
    log = tmp_path / "server.log"
    lines = ["ERROR the real cause: CUDA out of memory"]
    lines += ['INFO:     127.0.0.1:5 - "GET /metrics HTTP/1.1" 200 OK'] * 50
    lines += ['INFO:     127.0.0.1:5 - "GET /health HTTP/1.1" 200 OK', "INFO: shutting down"]
    log.write_text("\n".join(lines))
    assert rx.tail(log) == "ERROR the real cause: CUDA out of memory\nINFO: shutting down"
    assert (
        rx.exit_words(137) == "exited with code 137 (killed by SIGKILL, the kernel's out-of-memory killer?)"
    )
    assert rx.exit_words(3) == "exited with code 3"


def test_report_on_the_results_folder_names_the_runs_in_it(tmp_path, capsys):
    for run in ("20261201T000000Z_a", "20261202T000000Z_b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.json").write_text('{"config": {}}')
    assert rx.main(["--report", str(tmp_path)]) == 2
    assert "the newest runs in it: 20261201T000000Z_a, 20261202T000000Z_b" in capsys.readouterr().err


def test_help_lists_the_experiments(capsys):
    assert rx.main(["--help"]) == 0
    assert "1 kvcached, 2 static, 3 shared_kvcached" in " ".join(capsys.readouterr().out.split())


def test_check_refuses_what_the_run_refuses_after_its_checklist(fake_gpu, monkeypatch, capsys):
    """--check said every line was fine and exited 0 for two different cards, which the run refused."""
    monkeypatch.setenv("FAKE_GPU_COUNT", "2")
    monkeypatch.setenv("FAKE_GPU_NAMES", "Tesla T4 (fake),NVIDIA A10 (fake)")
    argv = ["--check", "--preset", "smoke", "--experiments", "1,2", "--gpus", "0,1", "--server-cmd", "true"]
    assert rx.main(argv, nvml_module=fake_gpu) == 2
    assert "--allow-mixed-gpus" in capsys.readouterr().err


def test_a_server_that_refuses_every_warm_up_request_fails_the_experiment_before_its_bursts(
    fake_gpu, tmp_path, monkeypatch
):
    monkeypatch.setenv("FAKE_NO_CHAT_TEMPLATE", "1")  # a base model: every chat completion is answered 400
    args = in_process_args(tmp_path / "r", *FAST, "--experiments", "2", "--bursts", "3")
    assert rx.main(args, nvml_module=fake_gpu) == 1
    (run,) = (tmp_path / "r").iterdir()
    (folder,) = run.glob("01_*")
    error = json.loads((folder / "error.json").read_text())["error"]
    assert "refused every warm-up request (HTTP 400" in error and "chat template" in error
    assert len((folder / "warmup.jsonl").read_text().splitlines()) == 8, "the warm-up is kept"
    assert not (folder / "requests.jsonl").exists() or not (folder / "requests.jsonl").read_text().strip()


def test_a_server_on_an_ipv6_address_is_reached_at_its_bracketed_url():
    class HealthOnV6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with HealthOnV6(("::1", 0), Healthy) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        server = dataclasses.replace(server_kept_by(None), host="::1")
        server.spec = rx.ServerSpec("A", "m", httpd.server_address[1], True)
        try:
            assert server.url == f"http://[::1]:{httpd.server_address[1]}"
            assert rx.health_ok(server), "an unbracketed ::1 read as no host: never ready, start-up timed out"
        finally:
            httpd.shutdown()


def test_a_signal_while_the_record_is_written_is_raised_once_it_is_written(tmp_path, monkeypatch):
    # a second Ctrl-C 5 ms after the first interrupted Trial.close before its save: experiment.json kept
    # no burst, although requests.jsonl held burst 1's rows
    monkeypatch.setattr(rx, "STATE", rx.RunState(lambda _: None))

    class SignalledWhileStopping:
        errors, error_kinds, missed_ticks = 0, {}, 0

        def stop(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here

    record = rx.ExperimentRecord("kvcached", "q")
    record.marks.bursts.append(rx.BurstMark("burst 1", "A", 0, 1.0))
    trial = rx.Trial(rx.Config(), None, {}, {}, SignalledWhileStopping(), record, tmp_path)
    previous = rx.install_stop_signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            trial.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    (burst,) = json.loads((tmp_path / "experiment.json").read_text())["marks"]["bursts"]
    assert burst["end"] is not None and not rx.STATE.stopping.is_set()


def test_a_home_folder_given_after_an_equals_sign_or_in_a_notebook_string_is_expanded(tmp_path, monkeypatch):
    # the shell expands ~ in `--models ~/a` but not in `--models=~/a`, nor does main("--models ~/a"):
    # the check found the folder, and vLLM was handed the literal '~/a', a Hugging Face id to it
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    cfg = rx.config_from_args(["--models=~/a,~/b", "--results-dir=~/runs", "--model-a=~/a"])
    assert (cfg.models, cfg.model_a) == (f"{tmp_path}/a,{tmp_path}/b", f"{tmp_path}/a")
    assert cfg.results_dir == f"{tmp_path}/runs"


def test_a_b_share_for_one_model_is_refused_as_such(capsys):
    # it said "for 1 models give every share in --static-shares", a flag one model has no use for
    assert rx.main(["--models", "org/a", "--pair-utilization-b", "0.3"], out=lambda _: None) == 2
    assert (
        "--pair-utilization-b: is model B's share of a pair, and one model has no B"
        in capsys.readouterr().err
    )


def test_prompts_cut_to_fit_the_model_length_say_so(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(rx, "STATE", rx.RunState(said.append))
    cfg = rx.config_from_args(["--preset", "smoke", "--prompt-tokens", "100000000"])
    assert cfg.prompt_tokens == 100000000, "the flag keeps its value: the plan cuts each prompt"
    assert (
        "note: prompts of --prompt-tokens 100000000 are cut to 1968 tokens, what --max-model-len 2048 leaves "
        "beside 16 output tokens and 64 of margin"
    ) in said


def test_a_cards_process_holds_a_passed_on_signal_until_main_reads_it(tmp_path, monkeypatch, capsys):
    # a Ctrl-C passed on while a card's process was still importing showed "[GPU 0] Traceback ..."
    masks = []

    def started(*args, **kwargs):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        raise RuntimeError("not started here")

    monkeypatch.setattr(rx.subprocess, "Popen", started)
    lane = types.SimpleNamespace(cfg=types.SimpleNamespace(gpu_index=0))
    run = types.SimpleNamespace(import_checks=None, config={"timing": {}}, lanes=[lane], run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="not started here"):
        rx.run_lanes(run, [])
    assert set(rx.STOP_SIGNALS) <= masks[0], "started with the stop signals held"
    assert not set(rx.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, []), "and released here"
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        # passed on while it imported (one thread then, here others may take a process's signal): pending
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        assert rx.main(["--help"], out=lambda _: None) == 130
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    assert "interrupted before anything was measured" in capsys.readouterr().err

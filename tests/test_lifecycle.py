"""Server lifecycle against the fake vLLM server: ready, crash, hang, grandchildren, stubborn servers."""

import contextlib
import errno
import functools
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Optional

import pytest
from conftest import (
    FAKE_SERVER_CMD,
    FAKES,
    KVC_A,
    STATIC_A,
    alive,
    fake_env,
    free_port,
    make_cfg,
    ready,
    rx,
    script_args,
    wait_for,
)


@pytest.fixture
def started(tmp_path):
    servers = []

    def start(cfg, spec):
        server = rx.start_server(cfg, spec, tmp_path / f"server_{spec.name}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        rx.stop_servers([server], "end of test", grace_s=2)


def test_ready_then_stopped_leaves_no_process(fake_gpu, started, monkeypatch):
    monkeypatch.setenv("FAKE_STARTUP_S", "0.3")  # the fake's default start-up, as slow as it gets here
    cfg = make_cfg()
    server = started(cfg, KVC_A(cfg))
    startup = ready(server)
    assert 0.2 < startup < 10
    tree = server.tree()
    assert len(tree) >= 2, "the fake, like vLLM, holds its memory in an engine child"
    rx.stop_servers([server], "end of test", grace_s=5)
    assert not any(alive(p) for p in tree)
    assert not rx.segment_path(server.spec.ipc_name).exists()


def test_crash_at_start_fails_fast_with_the_evidence(fake_gpu, started, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    cfg = make_cfg()
    server = started(cfg, STATIC_A(cfg))
    begin = time.time()
    with pytest.raises(rx.ServerError) as err:
        rx.wait_ready(server, timeout_s=60)
    assert time.time() - begin < 5
    message = str(err.value)
    assert "exited with code 3" in message
    assert str(server.log_path) in message
    assert "fake start-up failure" in message  # the log's tail, not "see logs"
    assert "--gpu-memory-utilization" in message  # the command


def test_removed_flag_makes_the_server_exit_at_once(fake_gpu, started):
    cfg = make_cfg(extra_server_args="--disable-log-requests")
    server = started(cfg, STATIC_A(cfg))
    with pytest.raises(rx.ServerError, match="exited with code 2") as refused:
        rx.wait_ready(server, timeout_s=30)
    headline = str(refused.value).splitlines()[0]  # the log's usage error, not the engine's start
    assert "refused its arguments" in headline and "--extra-server-args" in headline, headline
    assert "--engine-start" not in headline


def test_hanging_server_times_out_and_is_stopped(fake_gpu, started, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang")
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    cfg = make_cfg()
    server = started(cfg, STATIC_A(cfg))
    with pytest.raises(rx.ServerError, match="not ready after 1 s.*forked.*try --engine-start spawn"):
        rx.wait_ready(server, timeout_s=1.0)
    tree = server.tree()
    rx.stop_servers([server], "end of test", grace_s=2)
    assert not any(alive(p) for p in tree)


def test_a_server_command_that_never_reaches_vllm_gets_no_engine_start_advice(fake_gpu, started, monkeypatch):
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    cfg = make_cfg(server_cmd=f"{sys.executable} -m no_such_module_here")
    server = started(cfg, STATIC_A(cfg))
    with pytest.raises(rx.ServerError, match="exited with code 1") as err:
        rx.wait_ready(server, timeout_s=30)
    assert "No module named no_such_module_here" in str(err.value) and "--engine-start" not in str(err.value)


def ready_with_a_grandchild(started, monkeypatch, tmp_path) -> tuple:
    """A ready kvcached server that started a process of its own that outlives it, and that pid."""
    monkeypatch.setenv("FAKE_MODE", "grandchild")
    cfg = make_cfg()
    server = started(cfg, KVC_A(cfg))
    ready(server)
    pid_file = tmp_path / "gpu" / "grandchild.pid"
    assert wait_for(pid_file.exists)
    return server, int(pid_file.read_text())


def test_grandchild_is_stopped_with_the_group(fake_gpu, started, monkeypatch, tmp_path):
    server, grandchild = ready_with_a_grandchild(started, monkeypatch, tmp_path)
    assert alive(grandchild)
    rx.stop_servers([server], "end of test", grace_s=5)
    assert not alive(grandchild)


def test_server_ignoring_sigint_and_sigterm_is_killed(fake_gpu, started, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "ignore_sigterm")
    cfg = make_cfg()
    server = started(cfg, STATIC_A(cfg))
    ready(server)
    tree = server.tree()
    begin = time.time()
    said = []
    rx.STATE.out = said.append
    rx.stop_servers([server], "end of test", grace_s=0.5)
    assert not any(alive(p) for p in tree)
    assert time.time() - begin < 8
    # which processes held the stop up is said, by pid and name (never a command line: it can hold a key)
    (held,) = [line for line in said if "still running" in line]
    assert "0.5 s after SIGINT" in held and "fake_vllm" not in held, said
    assert f"{tree[1]} (python" in held, said


def ready_under_its_keeper(started) -> tuple:
    """A ready kvcached server, its process tree now, and its keeper's pid."""
    cfg = make_cfg()
    server = started(cfg, KVC_A(cfg))
    ready(server)
    return server, server.tree(), server.proc.pid


def test_leader_dead_but_engine_alive_is_still_stopped(fake_gpu, started):
    server, tree, keeper = ready_under_its_keeper(started)
    (api_server,) = [p for p in tree if rx.proc_stat(p)[1] == keeper]
    engine = [p for p in tree if p not in (keeper, api_server)]
    assert engine
    os.kill(api_server, signal.SIGKILL)  # the API server dies, the engine is orphaned
    rx.stop_servers([server], "end of test", grace_s=2)
    assert not any(alive(p) for p in engine)


def test_a_server_whose_keeper_is_killed_stops_all_the_same(fake_gpu, started):
    server, tree, keeper = ready_under_its_keeper(started)
    assert len(tree) >= 3, "keeper, API server and engine"
    os.kill(keeper, signal.SIGKILL)  # nothing of the keeper's own can run now
    assert wait_for(lambda: not any(alive(p) for p in tree if p != keeper), 20), "the server outlived it"
    assert rx.server_problem(server) == "ended when its keeper was killed (SIGKILL)"


def test_what_a_server_left_behind_its_killed_keeper_is_stopped_with_it(
    fake_gpu, started, monkeypatch, tmp_path
):
    server, grandchild = ready_with_a_grandchild(started, monkeypatch, tmp_path)
    os.kill(server.proc.pid, signal.SIGKILL)  # the keeper: its server gets SIGTERM, the grandchild nothing
    assert wait_for(lambda: server.proc.poll() is not None, 20)
    assert alive(grandchild), "nothing has stopped it yet"
    rx.stop_servers([server], "end of test", grace_s=2)
    assert wait_for(lambda: not alive(grandchild), 10), "left holding what it held"


def test_a_keeper_whose_harness_is_gone_scrubs_the_secrets_its_server_echoed(fake_gpu, started, monkeypatch):
    key = "sk-echoed-by-vllm-123"  # vLLM logs its non-default arguments, the key among them
    cfg = make_cfg(server_cmd=f"{FAKE_SERVER_CMD} --api-key {key}", api_key=key)
    monkeypatch.setattr(rx.STATE, "secrets", {key})
    server = started(cfg, KVC_A(cfg))
    ready(server)
    assert key in server.log_path.read_text(), "echoed, as vLLM does"
    os.close(server.control)  # the harness killed (kill -9): its end of the pipe closes with it
    server.control = None
    assert wait_for(lambda: server.proc.poll() is not None, 20)
    assert key not in server.log_path.read_text() and "'api_key': '***'" in server.log_path.read_text()
    assert "KEEPER_SECRETS" not in server.log_path.read_text()


def test_port_in_use_is_an_error_before_launch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        cfg = make_cfg(port_a=sock.getsockname()[1])
        with pytest.raises(rx.ServerError, match="already in use: listened on by pid"):
            rx.start_server(cfg, STATIC_A(cfg), tmp_path / "never.log")
    assert not (tmp_path / "never.log").exists()


def test_pool_reuses_a_server_and_stops_the_rest(fake_gpu, tmp_path):
    cfg = make_cfg()
    pool = rx.ServerPool(cfg)
    try:
        (first,) = pool.ensure([KVC_A(cfg)], tmp_path)
        (again,) = pool.ensure([KVC_A(cfg)], tmp_path)
        assert again is first
        tree = first.tree()
        (static,) = pool.ensure([STATIC_A(cfg)], tmp_path)
        assert static is not first and not any(alive(p) for p in tree)
    finally:
        rx.stop_servers(pool.shut(), "end of test")
    assert not pool.running and not alive(static.proc.pid)


def test_a_ctrl_c_while_a_server_starts_stops_it_saying_so(fake_gpu, tmp_path, monkeypatch, said):
    cfg = make_cfg()
    pool = rx.ServerPool(cfg)

    def interrupted(server, timeout_s):
        raise KeyboardInterrupt("signal 2")

    monkeypatch.setattr(rx, "wait_ready", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.ensure([KVC_A(cfg)], tmp_path)
        assert not pool.running
    finally:
        rx.stop_servers(pool.shut(), "end of test")
    assert any("(interrupted while it started)" in line for line in said), said
    assert not any("did not come up" in line for line in said), "it was never given the time to"


def test_sampler_attributes_memory_to_the_server_tree(fake_gpu, started, tmp_path):
    cfg = make_cfg()
    server = started(cfg, STATIC_A(cfg))
    ready(server)
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [server], tmp_path / "memory.jsonl", sample_hz=20, process_sample_hz=10)
    sampler.start()
    time.sleep(0.6)
    sampler.stop()
    rows = rx.read_jsonl(tmp_path / "memory.jsonl")
    process = [r for r in rows if r["kind"] == "process"]
    assert process and process[-1]["used_mib"] == pytest.approx(0.5 * 16384 + 300, rel=0.02)
    assert str(server.proc.pid) not in process[-1]["holders_mib"], "the API server holds no GPU memory"
    metrics = [r for r in rows if r["kind"] == "metrics"]
    assert metrics and metrics[-1]["running"] == 0


def test_sampler_survives_nvml_errors(fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_NVML_FLAKY", "1")
    nvml = rx.load_nvml(fake_gpu)
    sampler = rx.Sampler(nvml, 0, [], tmp_path / "memory.jsonl", sample_hz=50, process_sample_hz=5)
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    rows = rx.read_jsonl(tmp_path / "memory.jsonl")
    assert any(r["kind"] == "error" for r in rows) and sum(r["kind"] == "device" for r in rows) > 5
    assert sampler.errors > 0 and not sampler.is_alive()


def test_a_keeper_whose_log_cannot_be_written_still_kills_a_server_that_ignores_sigint(fake_gpu, monkeypatch):
    """The keeper's "still running ... SIGKILL now" line goes to the server's log: on a full disk the
    write fails, and the kill must have gone out all the same."""
    monkeypatch.setenv("FAKE_MODE", "ignore_sigterm")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKES), str(FAKES / "site")]))
    fake = f"{sys.executable} -S {FAKES / 'fake_vllm_server.py'} --model m --port {free_port()}"
    server = f"exec {fake} >/dev/null 2>&1"  # the server's own output is not the keeper's
    theirs, ours = os.pipe()
    command = [sys.executable, "-S", "-c", rx.keeper_source(), str(theirs), "", "0.3", "sh", "-c", server]
    with open("/dev/full", "w") as full:
        keeper = subprocess.Popen(
            command, stdout=full, stderr=full, pass_fds=(theirs,), start_new_session=True
        )
    os.close(theirs)
    gpu_dir = Path(os.environ["FAKE_GPU_DIR"])
    assert wait_for(lambda: list(gpu_dir.glob("*.json")), timeout=20), "the fake server never came up"
    engines = [int(p.stem) for p in gpu_dir.glob("*.json")]
    try:
        os.write(ours, b"stop 0.3\n")
        keeper.wait(timeout=30)
        assert wait_for(lambda: not any(alive(pid) for pid in engines), timeout=5), (
            "a server outlived its keeper"
        )
    finally:
        os.close(ours)
        for pid in engines:  # a failed run of this test leaves nothing behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_cards_process_whose_starter_died_before_it_could_hear_of_it_ends_at_once(monkeypatch):
    """PR_SET_PDEATHSIG takes hold only once the card's process runs: a starter killed before that sends
    no signal, so the card's process checks that its parent is still the one that started it."""
    monkeypatch.setenv(rx.LANE_PARENT, str(os.getppid() + 1))  # not this process's parent
    with pytest.raises(rx.ConfigError, match="ended before this card's started"):
        rx.check_lane_starter()
    monkeypatch.setenv(rx.LANE_PARENT, str(os.getppid()))
    rx.check_lane_starter()
    assert "check_lane_starter()" in inspect.getsource(rx.join_run), "the card's process checks it"


def test_a_full_disk_stops_the_run_at_once_with_one_line_naming_the_folder(tmp_path, monkeypatch, capsys):
    # each write after the first failed again while the last was handled: five chained tracebacks, the
    # next experiments started anyway, and no word of where the results were
    started = []

    def measured(*args):
        started.append(args)
        rx.write_json(tmp_path / "01_kvcached" / "experiment.json", {})

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rx, "run_experiment", measured)
    monkeypatch.setattr(rx, "resolve_experiment", lambda *args: None)
    monkeypatch.setattr(rx, "write_text_atomic", full)
    experiments = rx.parse_experiments("1,2")
    run = types.SimpleNamespace(
        run_dir=tmp_path, experiments=experiments, config={"servers": {}}, config_file="config.json"
    )
    run.plans, run.budget, run.nvml = {}, 0, None
    run.save_config = functools.partial(rx.Run.save_config, run)
    lane = types.SimpleNamespace(experiments=experiments, cfg=None)
    pool = types.SimpleNamespace(running={}, prepare=lambda *args: None)
    with pytest.raises(rx.ResultsUnwritable) as stopped:
        rx.run_lane_experiments(run, lane, pool)
    assert len(started) == 1, "the next experiment never starts"
    assert str(stopped.value).startswith(f"cannot write in {tmp_path} (No space left on device): the run")
    assert stopped.value.__suppress_context__, "one line, not the chain of each write that failed"
    monkeypatch.setattr(rx, "config_from_args", lambda argv: rx.Config())
    monkeypatch.setattr(rx, "prepare_run", lambda *args: rx.run_lane_experiments(run, lane, pool))
    assert rx.main([]) == 1
    assert capsys.readouterr().err == f"error: {stopped.value}\n"


def test_the_keepers_source_is_read_once_so_an_edit_mid_run_changes_no_later_keeper(monkeypatch):
    # read anew at each start, a file saved mid-run (an editor, a git checkout) gave a later keeper
    # another file's functions: "NameError: name 'keeper' is not defined", and its experiment failed
    assert rx.check_keeper().ok
    first = rx.keeper_source()

    def edited(function):
        raise OSError("the file changed")

    monkeypatch.setattr(inspect, "getsource", edited)
    assert rx.keeper_source() == first
    assert "def device_loop" in rx.program_source(rx.next_tick, rx.device_loop, rx.device_sampler, call="")


def import_check_of(harness: int) -> Optional[int]:
    """The pid of the harness's import-check Python, once it runs."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == harness and b"probe_module" in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


@pytest.mark.parametrize("preimport", ["off", "on"])
def test_sigterm_during_the_import_check_stops_it_and_leaves_no_run_folder(preimport, tmp_path):
    # SIGTERM before any handler: the harness died without a word and its import check's Python went on
    # importing (vLLM: 20-60 s); with --preimport on it outlived Ctrl-C too
    (tmp_path / "gpu").mkdir()
    args = script_args(tmp_path / "results", "--experiments", "1", "--preimport", preimport)
    args[args.index("--server-cmd") + 1] = f"{sys.executable} -S -m fake_vllm_server"
    env = fake_env(tmp_path / "gpu", FAKE_IMPORT_S="30")
    harness = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: import_check_of(harness.pid), timeout=30), "the import check started"
        check = import_check_of(harness.pid)
        harness.send_signal(signal.SIGTERM)
        said = harness.communicate(timeout=60)[0]
    finally:
        harness.kill()
    assert harness.returncode == 130, said
    assert wait_for(lambda: not alive(check), timeout=5), "the import check's Python was left importing"
    if preimport == "off":
        assert "interrupted before anything was measured" in said
        assert not list((tmp_path / "results").glob("*")), "no run folder of nothing measured"

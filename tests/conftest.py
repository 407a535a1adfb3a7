"""Shared test helpers: the harness imported as a module, fake servers on free ports, a fake NVML,
end-to-end runs of the whole script (some of them started in the background, see `background`)."""

import atexit
import concurrent.futures
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKES = ROOT / "tests" / "fakes"
FAKE_SERVER = FAKES / "fake_vllm_server.py"
# -S: the fake needs only the standard library and its own folders on PYTHONPATH, not site-packages
FAKE_SERVER_CMD = f"{sys.executable} -S {FAKE_SERVER}"
FAKE_PACKAGES = FAKES / "site"  # package metadata: the fakes imitate vLLM 0.24.0 and kvcached 0.1.6
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402


# --- markers -------------------------------------------------------------------------------------
def pytest_configure(config):
    background_folder(config)  # before xdist starts its workers: they inherit the environment
    config.addinivalue_line(
        "markers", "gpu: needs an NVIDIA GPU with vLLM and kvcached; skipped unless RUN_GPU_TESTS=1"
    )


def pytest_collection_modifyitems(config, items):
    # Tests that read a background run's result go last: the runs go on while the others run.
    items.sort(key=lambda item: any(name in BACKGROUND for name in getattr(item, "fixturenames", ())))
    if os.environ.get("RUN_GPU_TESTS") != "1":
        skip = pytest.mark.skip(reason="GPU test: set RUN_GPU_TESTS=1 to run it on a GPU machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def ephemeral_ports() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


HANDED_OUT: set[int] = set()


def worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "gw0")


def worker_ports() -> tuple[int, int]:
    """The ports this worker hands out: below the kernel's ephemeral range, a share of its own for each
    xdist worker (ports + LANE_PORT_STEP and a few after stay inside it too)."""
    low, high = ephemeral_ports()
    first, end = (10000, low) if low > 12000 else (high + 1, 65536)
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker_id().removeprefix("gw") or 0)
    share = (end - first) // count
    return first + index * share, first + (index + 1) * share - 2 * rx.LANE_PORT_STEP


def free_port() -> int:
    """A free port no other test of this session got, below the kernel's ephemeral range: a client
    connection of a test running meanwhile (some run in the background) never takes it as its local
    port before the server meant for it binds it."""
    span = worker_ports()
    for _ in range(500):
        port = random.randrange(*span)
        if port in HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:  # a crowded machine: any port the kernel offers
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def run_state(monkeypatch):
    """Each test gets the harness's run state (stop flags, secrets, output) fresh, as main() does."""
    state = rx.RunState()
    monkeypatch.setattr(rx, "STATE", state)
    return state


@pytest.fixture
def said(run_state):
    """What the harness printed during the test, one message per item."""
    messages: list[str] = []
    run_state.out = messages.append
    return messages


@pytest.fixture(autouse=True)
def quick_fake_startup(monkeypatch):
    """Fake servers started by the tests themselves accept connections 0.05 s after start-up
    (0.3 s by default); a test that needs a longer start-up sets FAKE_STARTUP_S itself."""
    monkeypatch.setenv("FAKE_STARTUP_S", "0.05")


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A fake card: state files of fake servers under FAKE_GPU_DIR, read by tests/fakes/pynvml.py."""
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    monkeypatch.setenv("FAKE_GPU_DIR", str(in_memory(gpu_dir)))
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "16384")
    monkeypatch.syspath_prepend(str(FAKES))
    sys.modules.pop("pynvml", None)
    import pynvml

    yield pynvml
    sys.modules.pop("pynvml", None)


def make_cfg(**overrides) -> "rx.Config":
    base = dict(
        preset="smoke",
        server_cmd=FAKE_SERVER_CMD,
        port_a=free_port(),
        port_b=free_port(),
        start_timeout_s=20,
    )
    base.update(overrides)
    return rx.resolve_config(rx.validate_config(rx.Config(**base)))


def in_process_args(results: Path, *extra: str) -> list[str]:
    """main()'s arguments for a run in this process against the fake server, on fresh ports."""
    server = ["--server-cmd", FAKE_SERVER_CMD, "--results-dir", str(results)]
    return [*extra, *server, "--port-a", str(free_port()), "--port-b", str(free_port())]


def KVC_A(cfg) -> "rx.ServerSpec":
    """Model A's kvcached server on the config's port A."""
    return rx.ServerSpec("A", "Qwen/Qwen2.5-0.5B-Instruct", cfg.port_a, kvcached=True)


def STATIC_A(cfg) -> "rx.ServerSpec":
    """Model A's static server (half the card) on the config's port A."""
    return rx.ServerSpec(
        "A", "Qwen/Qwen2.5-0.5B-Instruct", cfg.port_a, kvcached=False, gpu_memory_utilization=0.5
    )


def ready(server, timeout_s: float = 20):
    """rx.wait_ready, polling /health every 50 ms (the fakes come up in a fraction of a second)."""
    return rx.wait_ready(server, timeout_s=timeout_s, poll_s=0.05)


def wait_for(predicate, timeout=5.0, interval=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def alive(pid: int) -> bool:
    """A live process: any of its threads not a zombie, read from /proc (independent of the harness's
    helpers). A killed multi-threaded process's main thread is a zombie while its other threads still
    exit, and until the last one has, its files (a listening socket) are still open."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(thread_state(pid, thread) not in ("Z", "X", None) for thread in threads)


def thread_state(pid: int, thread: str):
    try:
        with open(f"/proc/{pid}/task/{thread}/status") as f:
            return next(line for line in f if line.startswith("State:")).split()[1]
    except (OSError, StopIteration):
        return None


# --- the whole script as a subprocess against the fakes
CARD_MIB, BASELINE_MIB = 16384, 400
# Small and quick, but every burst still spans several samples: bursts of 8 requests x 32 tokens at
# 8 ms per token (~0.3 s), per-process/kvcached/metrics samples every 0.1 s, device samples every 0.05 s.
FAST = [
    "--preset",
    "smoke",
    "--gap-s",
    "0.1",
    "--settle-s",
    "1",
    "--release-timeout-s",
    "5",
    "--idle-window-s",
    "0.25",
    "--overload-budget-gib",
    "0.25",
    "--prompt-tokens",
    "512",
    "--max-tokens",
    "16",
    "--burst-size",
    "8",
    "--process-sample-hz",
    "10",
    "--no-plots",  # drawing is a second of CPU per run; the runs that check plots pass --plots
]


# The environment before any test: a test that sets FAKE_* variables with monkeypatch while a background
# run starts must not hand them to that run.
SESSION_ENV = dict(os.environ)


def in_memory(gpu_dir: Path) -> Path:
    """The fake card's state files in /dev/shm behind `gpu_dir`, as a real card's memory is read from no disk.
    On disk, three fake runs once stopped sampling for about 0.9 s at the same moment (the fake servers'
    renames waiting on the journal behind the runs' fsyncs, it seems); in memory, no suite run has since."""
    if not gpu_dir.is_dir() or gpu_dir.is_symlink() or any(gpu_dir.iterdir()) or not SHM.is_dir():
        return gpu_dir
    gpu_dir.rmdir()
    gpu_dir.symlink_to(tempfile.mkdtemp(prefix=f"fake-gpu-{os.getpid()}-", dir=SHM))
    return gpu_dir


def remove_fake_cards_in_memory() -> None:
    for folder in SHM.glob(f"fake-gpu-{os.getpid()}-*"):
        shutil.rmtree(folder, ignore_errors=True)


SHM = Path("/dev/shm")
atexit.register(remove_fake_cards_in_memory)


def fake_env(gpu_dir: Path, **extra: str) -> dict:
    env = dict(
        SESSION_ENV,
        PYTHONPATH=os.pathsep.join([str(FAKES), str(FAKE_PACKAGES)]),
        FAKE_GPU_DIR=str(in_memory(gpu_dir)),
        FAKE_GPU_TOTAL_MIB=str(CARD_MIB),
        FAKE_GPU_BASELINE_MIB=str(BASELINE_MIB),
        FAKE_ITL_S="0.008",
        FAKE_STARTUP_S="0.05",
        PYTHONUNBUFFERED="1",
        ENABLE_KVCACHED="true",
    )  # a user's shell setting that must not leak into the static arm
    env.update(extra)
    return env


def script_args(results: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "run_experiments.py"),
        *FAST,
        "--results-dir",
        str(results),
        "--server-cmd",
        FAKE_SERVER_CMD,
        "--port-a",
        str(free_port()),
        "--port-b",
        str(free_port()),
        *extra,
    ]


# --- end-to-end runs in the background -----------------------------------------------------------
# The mocked end-to-end runs mostly sleep (idle windows, gaps, streamed tokens): four of them at once
# use about a core. A test module declares a background job with @background("name") and a fixture
# "name" that returns background_runs.result("name"); its tests only read what the job left. Every
# declared job that the collected tests use starts, at most BACKGROUND_SLOTS at a time, as the session's
# first test starts (start_background_runs), and the tests that read them run last
# (pytest_collection_modifyitems): the jobs go on while the others run.
#
# With pytest-xdist (pytest.ini asks for it) the tests run in several worker processes. One of them,
# the starter (gw0, or the only process without xdist), runs the jobs; each job leaves its result in a
# file of the session's background folder, which every worker reads.
BACKGROUND: dict = {}
BACKGROUND_SLOTS = 6


def background(name: str, weight: float = 1.0):
    """Declare a background job: fn(base: Path) returns either a command, dict(args=[...], env={...},
    cwd=None, timeout=s), run to its end with its output kept, or a scenario: a callable run in a
    thread whose return value the tests read. weight: about the seconds it takes on a quiet 2-core
    machine; the longest jobs start first (they bound the wall time), the short ones fill in after."""

    def register(fn):
        BACKGROUND[name] = (weight, fn)
        return fn

    return register


class BackgroundJob:
    """One job, run by the starter; run() leaves (value or error, seconds taken, the command's extra
    keys) in its result file."""

    def __init__(self, base: Path, job, result_file: Path):
        self.base, self.job, self.result_file = base, job, result_file
        self.proc = None

    def run(self):
        started = time.time()
        outcome = {}
        try:
            outcome["value"] = self.job() if callable(self.job) else self.command()
        except BaseException as e:  # handed to the test that reads it
            outcome["error"] = e
        outcome["elapsed"] = time.time() - started
        if not callable(self.job):
            outcome["extra"] = {k: v for k, v in self.job.items() if k not in ("args", "env", "cwd")}
        partial = self.result_file.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(outcome))
        partial.rename(self.result_file)

    def command(self) -> tuple[subprocess.CompletedProcess, Path]:
        out, err = self.base / "stdout.txt", self.base / "stderr.txt"
        with open(out, "w") as stdout, open(err, "w") as stderr:  # files: a full pipe never blocks a run
            self.proc = subprocess.Popen(
                self.job["args"], env=self.job["env"], cwd=self.job.get("cwd"), stdout=stdout, stderr=stderr
            )
            try:
                self.proc.wait(timeout=self.job.get("timeout", 240))
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
        return subprocess.CompletedProcess(
            self.job["args"], self.proc.returncode, out.read_text(), err.read_text()
        ), self.base


class BackgroundJobs:
    def __init__(self, names, tmp_path_factory, folder: Path, starter: bool):
        self.folder, self.starter, self.names = folder, starter, set(names)
        self.jobs, self.futures = {}, []
        if not starter:
            return
        self.pool = concurrent.futures.ThreadPoolExecutor(BACKGROUND_SLOTS, thread_name_prefix="background")
        for name in names:
            base = tmp_path_factory.mktemp(name)
            self.jobs[name] = BackgroundJob(base, BACKGROUND[name][1](base), folder / f"{name}.result")
            self.futures.append(self.pool.submit(self.jobs[name].run))

    def outcome(self, name: str, timeout_s: float = 900) -> dict:
        assert name in self.names, f"job {name} not started: only jobs a test names as a fixture start"
        path = self.folder / f"{name}.result"
        deadline = time.time() + timeout_s
        while not path.exists():
            assert time.time() < deadline, f"background job {name} left no result in {timeout_s:.0f} s"
            time.sleep(0.05)
        return pickle.loads(path.read_bytes())

    def result(self, name: str):
        """What the job left once it has ended: (CompletedProcess, its folder) for a command, else
        the scenario's return value; an exception in a scenario is raised here."""
        outcome = self.outcome(name)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def elapsed(self, name: str) -> float:
        return self.outcome(name)["elapsed"]

    def extra(self, name: str) -> dict:
        """A command job's own keys beside args, env and cwd (e.g. what it patched)."""
        return self.outcome(name)["extra"]

    def close(self, others_read_them: bool):
        """Other workers may still read the jobs: let them end. Otherwise jobs not started are
        dropped, commands still running killed (their keepers stop their servers); scenarios end by
        themselves within their own timeouts."""
        if not self.starter:
            return
        self.pool.shutdown(wait=others_read_them, cancel_futures=not others_read_them)
        for job in self.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                job.proc.kill()
        self.pool.shutdown(wait=True)


def background_folder(config) -> Path:
    """The session's folder for job results: made by the first process (xdist's controller, or the
    only one), passed to the workers through the environment and removed by its maker at the end."""
    if "TESTS_BACKGROUND_DIR" not in os.environ:
        os.environ["TESTS_BACKGROUND_DIR"] = config.background_folder_made = tempfile.mkdtemp(prefix="bg-")
    return Path(os.environ["TESTS_BACKGROUND_DIR"])


def pytest_unconfigure(config):
    if getattr(config, "background_folder_made", None):
        shutil.rmtree(config.background_folder_made, ignore_errors=True)


def succeeded_run(background_runs: "BackgroundJobs", name: str) -> Path:
    """The run folder a background command left, once it has ended with exit code 0."""
    result, base = background_runs.result(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return next((base / "results").iterdir())


def first_to_claim(marker: Path) -> bool:
    """Whether this process is the first to start the jobs: the first worker with a test, which under `-k`
    need not be gw0 (a worker given no test never starts them, and the tests on the others waited 900 s)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@pytest.fixture(scope="session")
def background_runs(request, tmp_path_factory):
    used = {name for item in request.session.items for name in item.fixturenames if name in BACKGROUND}
    jobs = BackgroundJobs(
        sorted(used, key=lambda n: (-BACKGROUND[n][0], n)),
        tmp_path_factory,
        background_folder(request.config),
        starter=first_to_claim(background_folder(request.config) / "starter"),
    )
    yield jobs
    jobs.close(others_read_them="PYTEST_XDIST_WORKER" in os.environ)


@pytest.fixture(scope="session", autouse=True)
def start_background_runs(request):
    """The background jobs start with the first test: they go on while the others run."""
    request.getfixturevalue("background_runs")


def signalled_run(
    base: Path, args: list, env: dict, sig: int, servers: int = 2, settle_s: float = 0.3, ports: tuple = ()
) -> dict:
    """Run the script until `servers` fake engines are up, send it `sig`, and say what was left."""
    import run_experiments

    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        up = wait_for(lambda: len(list((base / "gpu").glob("*.json"))) >= servers, timeout=60)
        time.sleep(settle_s)
        engines = [int(p.stem) for p in (base / "gpu").glob("*.json")]
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        return {
            "up": up,
            "rc": proc.returncode,
            "out": out,
            "engines": engines,
            "alive_after": [pid for pid in engines if alive(pid)],
            "ports_taken": [p for p in ports if run_experiments.port_taken("127.0.0.1", p)],
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def ports_free_at(offsets) -> int:
    """A free port p no other test got, with p + each offset free and not handed out either."""
    for _ in range(200):
        first = free_port()
        ports = [first + offset for offset in offsets]
        if all(p not in HANDED_OUT or p == first for p in ports) and not any(
            rx.port_taken("127.0.0.1", p) for p in ports
        ):
            HANDED_OUT.update(ports)
            return first
    raise RuntimeError("no free ports")


def lane_ports() -> tuple[int, int]:
    """Ports p, p+1 whose lane-1 twins (+LANE_PORT_STEP) are free too."""
    a = ports_free_at((0, 1, rx.LANE_PORT_STEP, 1 + rx.LANE_PORT_STEP))
    return a, a + 1


def two_card_args(base, *extra):
    a, b = lane_ports()
    args = script_args(base / "results", "--gpus", "0,1", *extra)
    args[args.index("--port-a") + 1], args[args.index("--port-b") + 1] = str(a), str(b)
    return args, a


def consecutive_ports(n: int) -> int:
    """The first of n consecutive free ports no other test got (--port: slot i on port + i)."""
    return ports_free_at(range(n))


# One run serves two sets of tests: no secret reaches the run folder (test_trust.py) and a mix of output
# lengths with SLOs (test_traffic.py); neither's checks depend on the other's flags.
SECRET_KEY, SECRET_TOKEN = "sk-unique-3f9a7c1e", "hf_unique_token_8d2b"
KVCACHED_ENV_SECRET = "kvc-env-secret-5e1d"


@background("secrets_and_length_mix_run", weight=4.5)
def secrets_and_length_mix_cmd(base):
    (base / "gpu").mkdir()
    env = fake_env(base / "gpu", HF_TOKEN=SECRET_TOKEN, KVCACHED_SECRET_THING="s3cr3t-value")
    length_mix = ["--output-tokens-dist", "uniform:4-40", "--slo-ttft-ms", "0.001", "--slo-tpot-ms", "10000"]
    secrets = [
        "--api-key",
        SECRET_KEY,
        "--kvcached-env",
        f"KVCACHED_LOG_LEVEL=INFO,KVCACHED_API_KEY={KVCACHED_ENV_SECRET}",
    ]
    args = script_args(base / "results", "--experiments", "1", *secrets, *length_mix)
    return dict(args=args, env=env, timeout=120)


@pytest.fixture
def secrets_and_length_mix_run(background_runs):
    """(the CompletedProcess, the job's folder, the run folder or None)."""
    proc, base = background_runs.result("secrets_and_length_mix_run")
    runs = sorted((base / "results").iterdir()) if (base / "results").exists() else []
    return proc, base, (runs[-1] if runs else None)


# One run serves the sleep arm's checks (test_sleep.py) and importing each next server ahead
# (test_speed.py): the sleep arm's figures do not depend on when a server's module was imported.
@background("sleep_and_preimport_run", weight=12)
def sleep_and_preimport_cmd(base):
    (base / "gpu").mkdir()
    args = script_args(base / "results", "--experiments", "1,2,6", "--plots", "--preimport", "on")
    args[args.index("--server-cmd") + 1] = f"{sys.executable} -S -m fake_vllm_server"
    env = fake_env(base / "gpu", FAKE_WAKE_S="0.2", FAKE_SLEEP_S="0.3", FAKE_IMPORT_S="1.0")
    return dict(args=args, env=env, timeout=180)


@pytest.fixture
def sleep_and_preimport_run(background_runs):
    return succeeded_run(background_runs, "sleep_and_preimport_run")

"""The benchmark scripts call this file's functions: each still runs, briefly, and prints its figures."""

import re
import subprocess
import sys

from conftest import ROOT, consecutive_ports, free_port


def bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_client_bench_prints_its_table():
    args = ("--rates", "20", "--duration-s", "1", "--streams", "8", "--closed-bursts", "1")
    out = bench("benchmarks/client_bench.py", *args)
    assert "| load | requests | sent (req/s) |" in out
    assert "| open loop 20 req/s | " in out and "| closed loop 8 streams x " in out


def test_sampler_bench_runs_against_the_fakes():
    # on a port of its own: a server of the user's (or another test's) may hold the default 8001
    out = bench("benchmarks/sampler_bench.py", "--fake", "--seconds", "1", "--", "--port-a", str(free_port()))
    assert "device samples:" in out and "Hz achieved at a 20 Hz setting" in out


def test_per_model_sampling_bench_prints_its_table():
    out = bench("benchmarks/per_model_sampling_bench.py", "--trials", "4", "--burst-s", "0.4")
    assert "| burst (s) | 2 samples a burst | 4 samples a burst |" in out
    assert out.splitlines()[3].startswith("| 0.4 | 100% | "), "two samples a burst always miss"
    assert "the problem asks for 8 samples a burst" in out


def test_preflight_fix_fuzz_applies_each_fix_and_counts():
    port = str(consecutive_ports(3))
    out = bench("benchmarks/preflight_fix_fuzz.py", "--cases", "6", "--seed", "5", "--port", port)
    counts = re.match(
        r"6 cases: (\d+) pass --check, (\d+) refused by a room check, (\d+) .* (\d+) of which", out
    )
    passed, refused, named, fixed = map(int, counts.groups())
    assert passed + refused <= 6 and fixed <= named <= refused
    assert named >= 1, "seed 5 draws a case whose fix names flags: the fix is applied and checked"
    assert "every fix that names flags passes" in out, out


def test_workspace_fit_holds_every_committed_gpu_run_within_the_room_checks_bounds():
    out = bench("benchmarks/workspace_fit.py")
    assert "22 runs; every point within the code's bounds" in out, out
    assert "ws_large_Qwen2.5-0.5B-vocab262k" in out and "ws_small_Qwen2.5-32B-shape" in out
    assert "ws_t32768_Qwen2.5-7B-Instruct" in out, "the batches past the large card's default count too"

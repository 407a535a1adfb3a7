"""The benchmark scripts call this file's functions: each still runs, briefly, and prints its figures."""

import subprocess
import sys

from conftest import ROOT, free_port


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

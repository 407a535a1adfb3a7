"""What the memory sampler costs: one idle server, the sampler alone, achieved rate and CPU.

    python benchmarks/sampler_bench.py --fake                         # fake NVML and a fake server
    python benchmarks/sampler_bench.py -- --model-a /path --load-format dummy   # a real vLLM server

Starts one server of the chosen arm with the harness's own code, waits until it is ready, then runs
run_experiments.Sampler alone for --seconds at the harness's default rates (20 Hz device memory,
2 Hz per-process memory, kvcached segment and /metrics) and prints the achieved device rate, the
ticks it skipped, its errors, and the CPU time of this process (the sampler's two threads; the main
thread only sleeps) and of the device-reading process as a share of one core, over the whole run and
once running (from 3 s on, leaving out the device process's start). Flags after `--` are the harness's
own flags.
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


STEADY_AFTER_S = 3.0


def process_cpu_s(pid) -> float:
    """User + system CPU seconds of a live process (or "self/task/TID", a thread), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(native_id: int) -> float:
    """User + system CPU seconds of one thread of this process."""
    return process_cpu_s(f"self/task/{native_id}")


def timed(fn, spent: list):
    """fn, adding the calling thread's CPU seconds in it to spent[0]."""

    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.thread_time() - start

    return wrapper


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the sampler runs alone")
    parser.add_argument(
        "--arm",
        choices=("kvcached", "static"),
        default="kvcached",
        help="the kind of server sampled (kvcached adds its segment reads)",
    )
    parser.add_argument(
        "--fake",
        action="store_true",
        help="fake NVML and a fake vLLM server from tests/fakes (no GPU needed)",
    )
    parser.add_argument("harness", nargs="*", help="run_experiments.py flags, after --")
    return parser.parse_args(argv)


def use_fakes(gpu_dir: str) -> list[str]:
    fakes = ROOT / "tests" / "fakes"
    sys.path.insert(0, str(fakes))
    os.environ.update(FAKE_GPU_DIR=gpu_dir, PYTHONPATH=str(fakes), FAKE_STARTUP_S="0.1")
    return ["--server-cmd", f"{sys.executable} {fakes / 'fake_vllm_server.py'}"]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        harness = (use_fakes(tmp) if args.fake else []) + args.harness
        rx.STATE.out = lambda _: None
        cfg = rx.resolve_config(rx.validate_config(rx.config_from_args(harness)))
        rx.STATE.out = print
        nvml = rx.load_nvml(__import__("pynvml") if args.fake else None)
        gpu = rx.gpu_facts(nvml, cfg.gpu_index)
        spec = (
            rx.kvcached_server(cfg, "A")
            if args.arm == "kvcached"
            else rx.static_server(cfg, "A", cfg.gpu_memory_utilization)
        )
        pool = rx.ServerPool(cfg, rx.pin_to_card(gpu, cfg.gpu_index))
        try:
            pool.ensure([spec], Path(tmp))
            server = pool.running[spec.key]
            sampler = rx.Sampler(
                nvml,
                cfg.gpu_index,
                [server],
                Path(tmp) / "memory.jsonl",
                cfg.sample_hz,
                cfg.process_sample_hz,
            )
            in_processes, in_metrics = [0.0], [0.0]  # the slow thread's two reads
            sampler.slow_rows = timed(sampler.slow_rows, in_processes)
            sampler.metrics_rows = timed(sampler.metrics_rows, in_metrics)
            cpu0, child0, wall0 = time.process_time(), children_cpu_s(), time.time()
            sampler.start()
            time.sleep(STEADY_AFTER_S)  # the device process has started and is ticking by now

            def threads() -> tuple:
                return (
                    thread_cpu_s(sampler.native_id),
                    thread_cpu_s(sampler.slow_thread.native_id),
                    in_processes[0],
                    in_metrics[0],
                )

            steady0 = (time.process_time(), process_cpu_s(sampler.child.pid), time.time(), threads())
            time.sleep(max(args.seconds - STEADY_AFTER_S, 1.0))
            steady1 = (time.process_time(), process_cpu_s(sampler.child.pid), time.time(), threads())
            sampler.stop()  # waits for the device process: its CPU time is counted from here
            cpu, wall = time.process_time() - cpu0, time.time() - wall0
            child = children_cpu_s() - child0
            times = [t for t, _ in sampler.device]
            achieved = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
            rows = rx.read_jsonl(Path(tmp) / "memory.jsonl")
            kinds = {
                k: sum(r.get("kind") == k for r in rows) for k in ("device", "process", "kvcached", "metrics")
            }
        finally:
            rx.stop_servers(pool.shut(), "end of the benchmark")
            nvml.nvmlShutdown()
    print(
        f"\nsampler alone for {wall:.1f} s against one idle {args.arm} server "
        f"({'fake' if args.fake else gpu['name']}):"
    )
    print(
        f"  device samples: {achieved:.2f} Hz achieved at a {cfg.sample_hz:g} Hz setting, "
        f"{sampler.missed_ticks} ticks skipped"
    )
    print(f"  rows written: {kinds}; errors: {sampler.errors} {sampler.error_kinds or ''}")
    print(
        f"  CPU: {cpu:.2f} s in this process (the file writer and the slow thread) + {child:.2f} s in the "
        f"device process, in {wall:.1f} s = {100 * (cpu + child) / wall:.2f}% of one core"
    )
    (c0, d0, w0, t0), (c1, d1, w1, t1) = steady0, steady1

    def share(seconds: float) -> str:
        return f"{100 * seconds / (w1 - w0):.2f}%"

    print(
        f"  once running (from {STEADY_AFTER_S:g} s on, the device process's start left out): "
        f"{c1 - c0:.2f} s + {d1 - d0:.2f} s in {w1 - w0:.1f} s = {share(c1 - c0 + d1 - d0)} of one core"
    )
    writer, slow, processes, metrics = (b - a for a, b in zip(t0, t1))
    print(
        f"    device process {share(d1 - d0)}; file writer thread {share(writer)}; slow thread {share(slow)} "
        f"(per-process memory and segment {share(processes)}, /metrics {share(metrics)}); "
        f"the rest of this process {share(c1 - c0 - writer - slow)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

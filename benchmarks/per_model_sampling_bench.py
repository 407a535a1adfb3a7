"""How many per-process samples a burst keep the per-model means adding up to the card's.

    python benchmarks/per_model_sampling_bench.py [--trials 100] [--burst-s 0.4 1.0 2.0]

Builds experiment folders shaped like a smoke run's shared_sleep on an H100: two sleep-mode servers
asleep at 948 MiB each beside 493 MiB of the card's own, A awake at 43,677 MiB for two bursts 1.05 s
apart, the card read every 50 ms and each process tree at a rate that gives K samples a burst, from a
random phase. run_experiments.summarize_experiment summarizes each, and the table counts the trials
whose per-model means missed the card's by more than PER_MODEL_TOLERANCE (n/a, with a problem), for
each burst length and K. SAMPLES_PER_BURST, the rate the problem asks for, is read off this table.
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402

CARD_OWN_MIB, ASLEEP_MIB, AWAKE_MORE_MIB, GAP_S, BURSTS = 493, 948, 42729, 1.05, 2


def sleep_pair_experiment(folder: Path, burst_s: float, process_hz: float, phase_s: float) -> Path:
    """One experiment folder: its memory.jsonl and experiment.json, as the harness writes them."""
    t0, start = 1000.0, 5.0
    bursts = [(start + k * (burst_s + GAP_S), start + k * (burst_s + GAP_S) + burst_s) for k in range(BURSTS)]
    end = bursts[-1][1]

    def own(name: str, t: float) -> float:
        awake = name == "A" and any(a <= t < b for a, b in bursts)
        return ASLEEP_MIB + (AWAKE_MORE_MIB if awake else 0)

    card = [i * 0.05 for i in range(int((end + 1) / 0.05))]
    rows = [
        {"kind": "device", "t": t0 + t, "used_mib": CARD_OWN_MIB + own("A", t) + own("B", t)} for t in card
    ]
    ticks = [phase_s + k / process_hz for k in range(int((end + 1) * process_hz))]
    rows += [
        {"kind": "process", "t": t0 + t, "server": name, "used_mib": own(name, t)}
        for t in ticks
        for name in "AB"
    ]
    rx.write_jsonl(folder / "memory.jsonl", sorted(rows, key=lambda r: r["t"]))
    servers = [
        {"spec": {"name": name, "model": "m", "sleep_mode": True}, "label": name, "startup_s": 1.0}
        for name in "AB"
    ]
    marks = {
        "idle_after_load": [t0 + 2, t0 + 3],
        "idle_before": [t0 + 3.5, t0 + 4.5],
        "workload": [t0 + start, t0 + end],
        "sampling_end": t0 + end + 0.7,
        "bursts": [
            {"phase": "main", "server": "A", "repeat": 0, "start": t0 + a, "end": t0 + b} for a, b in bursts
        ],
    }
    record = {"name": "shared_sleep", "question": "q", "servers": servers, "sample_interval_s": 0.05}
    rx.write_json(folder / "experiment.json", {**record, "finished": True, "marks": marks})
    return folder


def missed_share(burst_s: float, samples_per_burst: int, trials: int, rng: random.Random) -> float:
    """The share of trials whose per-model means are n/a."""
    process_hz = samples_per_burst / burst_s
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(trials):
            folder = Path(tmp) / str(trial)
            folder.mkdir()
            loaded = rx.load_experiment(
                sleep_pair_experiment(folder, burst_s, process_hz, rng.random() / process_hz)
            )
            summary = rx.summarize_experiment(loaded, 0.05)
            missed += any(p.startswith("per-model memory means n/a") for p in summary.problems)
    return missed / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="random phases per cell of the table")
    parser.add_argument("--burst-s", type=float, nargs="+", default=[0.4, 1.0, 2.0], help="burst lengths")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    per_burst = (2, 4, 6, 8, 12)
    tolerance = f"{rx.PER_MODEL_TOLERANCE:.0%}"
    print(f"per-model means n/a (missed the card's by more than {tolerance}), {args.trials} trials each")
    print("| burst (s) | " + " | ".join(f"{k} samples a burst" for k in per_burst) + " |")
    print("|---" * (len(per_burst) + 1) + "|")
    for burst_s in args.burst_s:
        shares = [missed_share(burst_s, k, args.trials, rng) for k in per_burst]
        print(f"| {burst_s:g} | " + " | ".join(f"{share:.0%}" for share in shares) + " |")
    print(f"the problem asks for {rx.SAMPLES_PER_BURST} samples a burst")


if __name__ == "__main__":
    main()

"""Two or more complete runs side by side, one table per question, from their summary.json files:

    python benchmarks/compare_runs.py results/RUN_1 results/RUN_2

Prints Markdown: memory (idle, peak, release) per experiment, latency ratios with each run's spread
over its repeats, the sleep arm, and where the time went. A latency ratio is called signal when
every run's spread over repeats lies on the same side of 1; otherwise it is within the noise.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run_experiments import fmt  # noqa: E402


def load(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def spread_text(spread: dict) -> str:
    return f"[{fmt(spread['min'], 2)}–{fmt(spread['max'], 2)}]" if spread and spread.get("n", 0) > 1 else ""


def verdict(spreads: list) -> str:
    """'signal: below 1' when every run's whole spread is below 1 (or above), else 'noise'."""
    if not spreads or any(not s or s.get("n", 0) < 2 for s in spreads):
        return "n/a"
    if all(s["max"] < 1 for s in spreads):
        return "**below 1**"
    if all(s["min"] > 1 for s in spreads):
        return "**above 1**"
    return "noise"


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def memory_table(runs: list) -> list:
    names = list(runs[0]["experiments"])
    out = [
        "### Memory (device, NVML, MiB)",
        "",
        row(
            [
                "experiment",
                "idle after load",
                "idle before workload",
                "peak",
                "release after the last burst (s)",
            ]
        ),
        row(["---"] * 5),
    ]
    any_reused = False
    for name in names:
        experiments = [r["experiments"].get(name, {}) for r in runs]
        devices = [e.get("device", {}) for e in experiments]

        def cell(key: str, digits: int = 0, devices: list = devices) -> str:
            return " / ".join(fmt(d.get(key), digits) for d in devices)

        marks = [
            " *" if reused_server(e) and d.get("idle_after_load_mib") is not None else ""
            for e, d in zip(experiments, devices)
        ]
        any_reused = any_reused or any(marks)
        after_load = " / ".join(fmt(d.get("idle_after_load_mib")) + m for d, m in zip(devices, marks))
        out.append(
            row([name, after_load, cell("idle_before_workload_mib"), cell("peak_mib"), cell("release_s", 2)])
        )
    note = [
        "",
        "\\* with a server reused from an earlier experiment of that run: not a fresh load, so it depends "
        "on what ran before (a kvcached server keeps the pages its bursts mapped); compare "
        "*idle before workload*.",
    ]
    return out + ["", "(run 1 / run 2 / ...)"] + (note if any_reused else [])


def reused_server(experiment: dict) -> bool:
    return any(server.get("reused") for server in experiment.get("servers", {}).values())


def ratio_rows(label: str, values: list, spreads: list) -> str:
    shown = " / ".join(f"{fmt(v, 2)} {spread_text(s)}".strip() for v, s in zip(values, spreads))
    return row([label, shown, verdict(spreads)])


KEYS = [
    ("ttft_s_p50", "TTFT p50"),
    ("ttft_s_p99", "TTFT p99"),
    ("e2e_s_p50", "E2E p50"),
    ("e2e_s_p99", "E2E p99"),
]


def ratio_of(block: dict, pair: str, key: str) -> tuple:
    """A comparison's ratio ('kvcached/static', 'ttft_s_p50') and its spread over repeats (or None)."""
    return block["ratios"][pair][key], ((block.get("over_repeats") or {}).get(pair) or {}).get(key)


def ratio_row(label: str, blocks: list, pair: str, key: str) -> str:
    values, spreads = zip(*(ratio_of(b, pair, key) for b in blocks))
    return ratio_rows(label, list(values), list(spreads))


def entry_rows(title: str, blocks: list, entries: str, prefix: str = "") -> list:
    """One row per entry (model or phase) and latency key of a pair comparison, across runs."""
    return [
        ratio_row(
            f"{title}, {prefix}{entry}, kvcached/static, {label}",
            [b[entries][entry] for b in blocks],
            "kvcached/static",
            key,
        )
        for entry in blocks[0][entries]
        for key, label in KEYS
    ]


def with_strategies(comparisons: list, group: str, *strategies: str) -> list:
    """Each run's comparison of `group`, or [] unless every run has one with all of `strategies`."""
    blocks = [c.get(group) for c in comparisons]
    return blocks if all(b and set(strategies) <= set(b["figures"]) for b in blocks) else []


def latency_tables(runs: list) -> list:
    out = [
        "### Latency ratios (each run: ratio over all its requests [min–max over its repeats])",
        "",
        row(["comparison", "runs", "outside the noise?"]),
        row(["---"] * 3),
    ]
    comparisons = [r["comparison"] for r in runs]
    single = with_strategies(comparisons, "single", "kvcached", "static")
    out += [
        ratio_row(f"one model, kvcached/static, {label}", single, "kvcached/static", key)
        for key, label in (KEYS[::2] if single else [])
    ]
    shared = with_strategies(comparisons, "shared", "kvcached", "static")
    out += entry_rows("two models", shared, "per_model", "model ") if shared else []
    overload = with_strategies(comparisons, "overload", "kvcached", "static")
    out += entry_rows("overload", overload, "per_phase") if overload else []
    for group in ("single", "shared"):
        for versus in ("kvcached", "static"):
            blocks = with_strategies(comparisons, group, "sleep", versus)
            out += [
                ratio_row(f"{group} sleep, sleep/{versus}, {label}", blocks, f"sleep/{versus}", key)
                for key, label in (KEYS[::2] if blocks else [])
            ]
    return out


def sleep_table(runs: list) -> list:
    out = [
        "### Sleep mode (level 1)",
        "",
        row(
            [
                "",
                "asleep (MiB)",
                "kvcached idle (MiB)",
                "static idle (MiB)",
                "wake-up mean / max (s)",
                "awake peak (MiB)",
            ]
        ),
        row(["---"] * 6),
    ]
    for group, experiment in (("single", "sleep"), ("shared", "shared_sleep")):
        for i, run in enumerate(runs):
            figures = (run["comparison"].get(group) or {}).get("figures", {})
            if "sleep" not in figures:
                continue
            sleep = run["experiments"].get(experiment, {})
            wake = (sleep.get("sleep") or {}).get("wake_s") or {}
            idle = {arm: (figures.get(arm) or {}).get("idle_before_workload_mib") for arm in figures}
            out.append(
                row(
                    [
                        f"{group}_sleep (run {i + 1})",
                        fmt(idle["sleep"]),
                        fmt(idle.get("kvcached")),
                        fmt(idle.get("static")),
                        f"{fmt(wake.get('mean'), 2)} / {fmt(wake.get('max'), 2)}",
                        fmt(sleep.get("device", {}).get("peak_mib")),
                    ]
                )
            )
    return out


def time_table(runs: list) -> list:
    out = [
        "### Time",
        "",
        row(["run", "wall (s)", "preflight", "start-ups (paid / reused)", "workload", "harness's own time"]),
        row(["---"] * 6),
    ]
    for i, run in enumerate(runs):
        t, starts = run.get("timing") or {}, run.get("server_starts") or {}
        out.append(
            row(
                [
                    f"run {i + 1}",
                    fmt(t.get("wall_s")),
                    fmt(t.get("preflight_s")),
                    f"{fmt(t.get('startups_s'))} ({starts.get('started')} / {starts.get('reused')})",
                    fmt(t.get("workload_s")),
                    f"{fmt(t.get('harness_overhead_s'))} "
                    f"({fmt(100 * (t.get('harness_overhead_share') or 0), 1)}%)",
                ]
            )
        )
    return out


def main(argv: list) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    runs = [load(d) for d in argv]
    print(
        "\n".join(
            ["Runs: " + ", ".join(r["run"] for r in runs), ""]
            + memory_table(runs)
            + [""]
            + latency_tables(runs)
            + [""]
            + sleep_table(runs)
            + [""]
            + time_table(runs)
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

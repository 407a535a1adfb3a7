"""What vLLM holds beyond weights and KV, fitted over the committed GPU runs, against the room checks' bounds.

    python benchmarks/workspace_fit.py [workspace_runs.log ...]

Reads the logs of tests/gpu/workspace_check.sh (by default the three committed folders): per run, the
static server's workspace (share x card - weights - vLLM's "Available KV cache memory") and each server's
rest (summary.md's "What each server holds": NVML total - weights - KV), both beyond the weights the room
checks estimate from config.json. Fits base + max(b x vocabulary x rows, tokens x (i x intermediate + h x
hidden)) + s x weights with the smallest worst miss, prints it beside run_experiments' VLLM_WORKSPACE and
VLLM_SERVER_REST, then each point and whether the code's least and most hold it. No GPU is needed.
"""

import argparse
import itertools
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_shapes import KIT_FOLDERS  # noqa: E402  (benchmarks/)

import run_experiments as rx  # noqa: E402

LOGS = [
    ROOT / "results/20261207T142453Z_workspace_check/workspace_runs.log",
    ROOT / "results/20261207T155541Z_large_workspace_check/workspace_runs.log",
    ROOT / "results/20261207T193842Z_batch_workspace_check/workspace_runs.log",
]
# Each tier's batch: (tokens, sequences); tN is N tokens at vLLM's 1,024 sequences (workspace_check.sh)
TIERS = {"small": rx.VllmBatch(2048, 256), "large": rx.VllmBatch(8192, 1024)}
RUN = re.compile(
    r"(ws_(small|large|t\d+)_\S+): card .* weights ([\d.]+) GiB, KV -?[\d.]+ GiB: workspace ([\d.]+) GiB"
)
REST = re.compile(r"^\| (kvcached|static) \| .* \| ([\d,]+) \|$")


def tier_batch(tier: str) -> "rx.VllmBatch":
    return TIERS.get(tier) or rx.VllmBatch(int(tier[1:]), 1024)


def points(paths: list[Path]) -> list[dict]:
    """A point per run: name, vocabulary, rows, weights by config.json (rx.weight_bytes, what the room checks
    count), and the workspace and its servers' least rest (bytes) as the checks must add to those weights:
    vLLM's own weight figure holds some buffers beside them (up to 0.11 GiB here)."""
    runs: dict[str, dict] = {}
    current = None
    for line in (line for path in paths for line in path.read_text().splitlines()):
        line = re.sub(r"^\[[\d:]+\] ", "", line)
        if found := RUN.search(line):
            name, tier, vllm_weights, workspace = found.groups()
            config = KIT_FOLDERS[name.split("_", 2)[2]]
            estimated = rx.weight_bytes(config)
            beyond = (
                float(vllm_weights) * rx.GIB - estimated
            )  # what vLLM counts as weights beyond the estimate
            batch = tier_batch(tier)
            current = runs.setdefault(name, dict(name=name, tier=tier, rows=batch.rows, rests=[]))
            current.update(vocabulary=config["vocab_size"], weights=estimated, beyond=beyond, config=config)
            current["workspace"] = float(workspace) * rx.GIB + beyond
        elif (found := REST.match(line)) and current is not None:
            current["rests"].append(int(found.group(2).replace(",", "")) * rx.MIB + current["beyond"])
    return [dict(run, rest=min(run["rests"])) for run in runs.values() if run["rests"]]


def least_squares(runs: list[dict], key: str) -> tuple[float, ...]:
    """The form's constants with the smallest worst miss: a grid over the sampler's and the activations'
    bytes, base and weight share by least squares at each."""
    best = None
    for per_row, per_intermediate, per_hidden in itertools.product(
        np.arange(13.0, 16.01, 0.2), np.arange(0.0, 9.01, 0.25), np.arange(0.0, 12.01, 0.5)
    ):
        fit = rx.MemoryFit(0, per_row, per_intermediate, per_hidden, 0.0, 0, 0)
        terms = np.array([[1.0, r["weights"]] for r in runs])
        shared = np.array([r[key] - fit.fitted(r["config"], tier_batch(r["tier"]), 0) for r in runs])
        (base, share), *_ = np.linalg.lstsq(terms, shared, rcond=None)
        worst = np.abs(shared - terms @ (base, share)).max()
        if best is None or worst < best[0]:
            best = (worst, base, per_row, per_intermediate, per_hidden, share)
    return best[1:]


def report(name: str, fit: "rx.MemoryFit", runs: list[dict], key: str, unit: int, label: str) -> list[str]:
    base, per_row, per_intermediate, per_hidden, share = least_squares(runs, key)
    form = "B x vocabulary x rows, {:.2f} B x tokens x intermediate + {:.2f} B x tokens x hidden) +"
    print(
        f"\n{name}: fitted {base / unit:.3f} {label} + max({per_row:.2f} "
        f"{form.format(per_intermediate, per_hidden)} {share:.2%}"
    )
    code = (
        f"{fit.base / unit:.3f} {label} + max({fit.per_vocab_row:.2f} "
        f"{form.format(fit.per_intermediate, fit.per_hidden)} {fit.weight_share:.2%}"
    )
    print(f"  the code: {code},")
    print(f"  least {fit.below / unit:.3f} {label} below it, most {fit.above / unit:.3f} above")
    outside = []
    for run in runs:
        value, fitted = run[key], fit.fitted(run["config"], tier_batch(run["tier"]), int(run["weights"]))
        held = fitted - fit.below <= value <= fitted + fit.above
        print(
            f"  {run['name']:40} {value / unit:8.3f} fitted {fitted / unit:8.3f} {'' if held else 'OUTSIDE'}"
        )
        outside += [] if held else [run["name"]]
    return outside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="*", type=Path, default=LOGS)
    runs = points(parser.parse_args().logs)
    outside = report(
        "workspace", rx.VLLM_WORKSPACE, [r for r in runs if "weights" in r], "workspace", rx.GIB, "GiB"
    )
    outside += report("server rest", rx.VLLM_SERVER_REST, runs, "rest", rx.MIB, "MiB")
    print(
        f"\n{len(runs)} runs; "
        + (
            f"outside the code's bounds: {', '.join(outside)}"
            if outside
            else "every point within the code's bounds"
        )
    )
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())

"""The experiment table is the one place an experiment is defined: a toy group added here runs end to
end against the fakes and is compared, plotted and reported like the built-in ones."""

import json
import sys

import pytest
from conftest import ROOT, background, fake_env, script_args, succeeded_run

# The whole script with a toy group added to its table, in a process of its own (a background job):
# the table is patched there, not in the test process.
TOY_DRIVER = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import run_experiments as rx

only_b = lambda cfg, budget: (rx.kvcached_server(cfg, "B"),)
static_b = lambda cfg, budget: (rx.static_server(cfg, "B", 0.3),)
b_bursts = lambda bursts, slots: tuple(rx.Step(f"B burst {{b + 1}}", "B", "main", b) for b in range(bursts))
rx.GROUPS = {{**rx.GROUPS, "toy": rx.Group("toy", pair=False, ratios_by="model", plot="toy_memory.png")}}
rx.EXPERIMENTS = rx.EXPERIMENTS + [
    rx.Experiment(
        9, "toy_kvcached", "toy", "kvcached", "Model B alone, elastic?", only_b, b_bursts, ("main",)
    ),
    rx.Experiment(9, "toy_static", "toy", "static", "Model B alone, static?", static_b, b_bursts, ("main",)),
]
sys.exit(rx.main(sys.argv[1:]))
"""


@background("toy_group_run", weight=7)
def toy_group_run_cmd(base):
    (base / "gpu").mkdir()
    args = script_args(base / "results", "--experiments", "9", "--bursts", "2", "--plots")
    return dict(args=[sys.executable, "-c", TOY_DRIVER, *args[2:]], env=fake_env(base / "gpu"), timeout=120)


@pytest.fixture
def toy_group_run(background_runs):
    return succeeded_run(background_runs, "toy_group_run")


def test_a_toy_experiment_group_runs_end_to_end(toy_group_run):
    run = toy_group_run
    assert sorted(p.name for p in run.glob("0*")) == ["01_toy_kvcached", "02_toy_static"]
    summary = json.loads((run / "summary.json").read_text())
    toy = summary["comparison"]["toy"]["figures"]
    idle = {arm: toy[arm]["idle_before_workload_mib"] for arm in ("static", "kvcached")}
    assert idle["static"] - idle["kvcached"] > 1000, (
        "B's static pool (0.3 of the card) against kvcached's few pages"
    )
    assert summary["experiments"]["toy_kvcached"]["servers"]["B"]["latency"]["ok"] == 16
    assert {"toy_memory.png", "latency.png"} <= set(summary["plots"])
    assert "**One model:**" in (run / "summary.md").read_text()

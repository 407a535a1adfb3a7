"""The experiment table is the one place an experiment is defined: a toy group added here runs end to
end against the fakes and is compared, plotted and reported like the built-in ones."""

import json
import sys

from conftest import FAKE_SERVER, FAST, free_port, rx


def test_a_toy_experiment_group_runs_end_to_end(fake_gpu, tmp_path, monkeypatch):
    only_b = lambda cfg, budget: (rx.kvcached_server(cfg, "B"),)
    static_b = lambda cfg, budget: (rx.static_server(cfg, "B", 0.3),)
    b_bursts = lambda bursts: tuple(rx.Step(f"B burst {b + 1}", "B", "main", b) for b in range(bursts))
    monkeypatch.setattr(
        rx,
        "GROUPS",
        {**rx.GROUPS, "toy": rx.Group("toy", pair=False, ratios_by="model", plot="toy_memory.png")},
    )
    monkeypatch.setattr(
        rx,
        "EXPERIMENTS",
        rx.EXPERIMENTS
        + [
            rx.Experiment(
                9, "toy_kvcached", "toy", "kvcached", "Model B alone, elastic?", only_b, b_bursts, ("main",)
            ),
            rx.Experiment(
                9, "toy_static", "toy", "static", "Model B alone, static?", static_b, b_bursts, ("main",)
            ),
        ],
    )
    said = []
    rc = rx.main(
        [
            *FAST,
            "--experiments",
            "9",
            "--results-dir",
            str(tmp_path / "results"),
            "--server-cmd",
            f"{sys.executable} {FAKE_SERVER}",
            "--port-a",
            str(free_port()),
            "--port-b",
            str(free_port()),
            "--bursts",
            "2",
        ],
        nvml_module=fake_gpu,
        out=said.append,
    )
    assert rc == 0, "\n".join(said[-30:])
    (run,) = (tmp_path / "results").iterdir()
    assert sorted(p.name for p in run.glob("0*")) == ["01_toy_kvcached", "02_toy_static"]
    summary = json.loads((run / "summary.json").read_text())
    toy = summary["comparison"]["toy"]
    assert toy["idle_saving_mib"] > 1000, "B's static pool (0.3 of the card) against kvcached's few pages"
    assert summary["experiments"]["toy_kvcached"]["servers"]["B"]["latency"]["ok"] == 16
    assert {"toy_memory.png", "latency.png"} <= set(summary["plots"])
    assert "**One model:**" in (run / "summary.md").read_text()

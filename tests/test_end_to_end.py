"""The whole script as a subprocess against fake vLLM servers and a fake NVML whose memory follows
the servers: the static arm reserves its pool at start, the kvcached arm grows with live requests.
Runs whose tests only read what they left go in the background (conftest.background), a few at once,
while this module's first tests run in the foreground."""

import gzip
import json
import os
import re
import shutil
import signal
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import BASELINE_MIB, CARD_MIB, ROOT, alive, background, fake_env, rx, script_args, signalled_run

# --- committed runs: --report rebuilds the golden one's summary.json and summary.md exactly, and every
# other committed folder still parses (tests/rebuild_committed.py says how) ---------------------------
COMMITTED_RUNS = sorted(p.parent for p in (ROOT / "results").rglob("config.json"))
REFERENCE = ROOT / "results" / "20261128T214012Z_reference_check"
GOLDEN_RUN = REFERENCE / "20261128T214032Z_reference_1"  # the newest complete reference: all experiments
REPORT_CLI_RUN = ROOT / "results" / "20261206T103647Z_seed_after_merges"  # small: the tutorial's three


def rebuildable_copy(reference, tmp_path):
    """The committed run without its summaries and plots (rebuilt below), in a fresh folder of its name."""
    copy = tmp_path / reference.name
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns("*.png"))
    (copy / "summary.json").unlink()
    (copy / "summary.md").unlink()
    return copy


@background("committed_rebuilds", weight=13)
def committed_rebuilds_cmd(base):
    return dict(
        args=[sys.executable, str(ROOT / "tests" / "rebuild_committed.py"), str(base)],
        env=dict(os.environ),
        timeout=300,
    )


@pytest.fixture
def committed_rebuilds(background_runs):
    result, base = background_runs.result("committed_rebuilds")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((base / "rebuilds.json").read_text())


def test_the_golden_run_is_the_newest_complete_reference():
    complete = [
        run
        for run in COMMITTED_RUNS
        if len(json.loads((run / "summary.json").read_text())["experiments"]) == len(rx.EXPERIMENTS)
    ]

    def stamp(run):  # reference_1 and _2 started together; _1 ended last
        return run.name.split("_")[0]

    assert GOLDEN_RUN in complete and stamp(GOLDEN_RUN) == max(stamp(run) for run in complete)


@pytest.mark.parametrize("reference", COMMITTED_RUNS, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_committed_run_rebuilds_or_parses(reference, committed_rebuilds):
    rebuilt = committed_rebuilds[str(reference.relative_to(ROOT / "results"))]
    assert rebuilt["rc"] == 0
    if reference == GOLDEN_RUN:
        assert rebuilt["how"] == "rebuild"
        assert rebuilt["json_same"] and rebuilt["md_same"], f"compare {rebuilt['copy']} with {reference}"
        return
    if rebuilt["how"] == "same format":  # its raw files look like those of a folder parsed in full
        assert (
            committed_rebuilds[rebuilt["as"]]["rc"] == 0
            and committed_rebuilds[rebuilt["as"]]["how"] != "same format"
        )
        return
    committed = sorted(json.loads((reference / "summary.json").read_text())["experiments"])
    assert rebuilt["experiments"] == committed, f"see {rebuilt['copy']}"
    assert not rebuilt.get("problems") and not rebuilt.get("empty"), rebuilt


@background("report_cli_run", weight=3)
def report_cli_cmd(base):
    # without plots (the golden rebuild above draws them): two seconds of CPU less, and the summaries
    # differ from the committed ones only in their list of plots
    copy = rebuildable_copy(REPORT_CLI_RUN, base)
    return dict(
        args=[sys.executable, str(ROOT / "run_experiments.py"), "--report", str(copy), "--no-plots"],
        env=dict(os.environ),
        timeout=120,
    )


@pytest.fixture
def report_cli_run(background_runs):
    return background_runs.result("report_cli_run")


def test_report_command_rebuilds_a_committed_run(report_cli_run):
    assert REPORT_CLI_RUN in COMMITTED_RUNS
    proc, base = report_cli_run
    copy = base / REPORT_CLI_RUN.name
    assert proc.returncode == 0, proc.stderr
    committed = json.loads((REPORT_CLI_RUN / "summary.json").read_text())
    assert json.loads((copy / "summary.json").read_text()) == {**committed, "plots": []}
    drawn = "Plots:\n\n" + "".join(f"![{p}](plots/{p})\n" for p in committed["plots"])
    not_drawn = "Plots: none drawn (--no-plots; `--report` without it draws them).\n"
    committed_md = (REPORT_CLI_RUN / "summary.md").read_text()
    assert drawn in committed_md
    assert (copy / "summary.md").read_text() == committed_md.replace(drawn, not_drawn)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"] == str(copy)
    assert f"summary: {copy / 'summary.md'}" in proc.stdout.splitlines()


def test_reference_figures_are_the_h200_ones():
    for run in ("20261128T214032Z_reference_1", "20261128T214032Z_reference_2"):
        device = {
            name: e["device"]
            for name, e in json.loads((REFERENCE / run / "summary.json").read_text())["experiments"].items()
        }
        assert device["static"]["idle_after_load_mib"] == 80011.875
        assert device["kvcached"]["idle_after_load_mib"] == 5323.875
        assert set(device) == {e.name for e in rx.parse_experiments("all")}, "every default experiment"


@background("sigterm_scenario", weight=2.5)
def sigterm_scenario_job(base):
    def scenario():
        (base / "gpu").mkdir()
        args = script_args(base / "results", "--experiments", "3", "--bursts", "50", "--gap-s", "1")
        return signalled_run(base, args, fake_env(base / "gpu"), signal.SIGTERM)

    return scenario


@pytest.fixture
def sigterm_scenario(background_runs):
    return background_runs.result("sigterm_scenario")


def test_sigterm_stops_every_server(sigterm_scenario):
    run = sigterm_scenario
    assert run["up"], "servers up"
    assert run["rc"] == 130, run["out"][-2000:]
    assert "stopping every server" in run["out"]
    assert run["engines"] and not run["alive_after"]


# --- one run of all six experiments, read by the tests below ---------------------------------------
# After the run, the same job rebuilds its summary offline (--report without the fakes' pynvml on the
# path, and without plots: the run drew them) in a copy of the run folder, for
# test_report_rebuilds_the_same_summary_offline.
FULL_RUN_THEN_REPORT = f"""
import os, shutil, subprocess, sys
from pathlib import Path
base, args = Path(sys.argv[1]), sys.argv[2:]
rc = subprocess.call(args)
if rc == 0:
    (run,) = (base / "results").iterdir()
    copy = base / "report" / run.name
    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    with open(base / "report.out", "w") as out, open(base / "report.err", "w") as err:
        code = subprocess.call(
            [sys.executable, {str(ROOT / "run_experiments.py")!r}, "--report", str(copy), "--no-plots"],
            stdout=out, stderr=err, env=dict(os.environ, PYTHONPATH=""), timeout=120,
        )
    (base / "report.rc").write_text(str(code))
sys.exit(rc)
"""


@background("full_run", weight=28)
def full_run_cmd(base):
    (base / "gpu").mkdir()
    # --ignore-eos: every answer runs its full length, so each burst holds its KV (and the static
    # overload pair its queue) for several sampling intervals instead of thinning out request by request.
    # The kvcached and static experiments; the sleep arm has runs of its own (test_sleep.py).
    args = script_args(base / "results", "--ignore-eos", "--experiments", "1,2,3,4,5", "--plots")
    return dict(
        args=[sys.executable, "-c", FULL_RUN_THEN_REPORT, str(base), *args],
        env=fake_env(base / "gpu"),
        timeout=240,
    )


@pytest.fixture(scope="module")
def full_run(background_runs):
    proc, base = background_runs.result("full_run")
    elapsed = background_runs.elapsed("full_run")
    print(f"mocked end-to-end run: {elapsed:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (base / "results").iterdir()
    return {
        "proc": proc,
        "run_dir": run_dir,
        "gpu_dir": base / "gpu",
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "elapsed": elapsed,
        "base": base,
    }


def test_last_stdout_line_is_the_headline_json(full_run):
    last = full_run["proc"].stdout.strip().splitlines()[-1]
    headline = json.loads(last)
    assert Path(headline["run_dir"]) == full_run["run_dir"]
    assert set(headline["experiments"]) == {
        "kvcached",
        "static",
        "shared_kvcached",
        "shared_static",
        "overload_kvcached",
        "overload_static",
    }
    assert "Infinity" not in last and "NaN" not in last
    digits = [len(m.replace(".", "").lstrip("0")) for m in re.findall(r"(?<![\w.])\d+\.\d+(?![\d.e])", last)]
    assert digits and max(digits) <= 6, "floats are printed to 6 significant digits, not 17"


def test_static_arm_reserves_its_pool_and_kvcached_does_not(full_run):
    exps = full_run["summary"]["experiments"]
    static, kvc = exps["static"]["device"], exps["kvcached"]["device"]
    # fake static server, as real vLLM: 0.55 of the card plus its CUDA context, flat under load
    assert static["idle_after_load_mib"] == pytest.approx(BASELINE_MIB + 0.55 * CARD_MIB + 300, rel=0.01)
    assert static["flex_mib"] == pytest.approx(0, abs=1)
    # fake kvcached server: weights + small prealloc when idle, grows with live requests
    assert kvc["idle_after_load_mib"] < static["idle_after_load_mib"] / 3
    assert kvc["flex_mib"] > 20
    assert kvc["release_s"] is not None and kvc["release_s"] < 5
    # and, as real kvcached, it settles a little above its just-loaded level after the first burst: the
    # fake keeps 64 MiB mapped for good once it has served a request. Where it ends is read once the
    # release wait is over, i.e. back within --release-tolerance of the idle level before the workload
    # (which holds those 64 MiB): a page or two of the last requests may still be on their way back then
    # (the fake frees them 50 ms after each request, later on a busy machine), never more than that.
    kept_mib = 64
    tolerance = json.loads((full_run["run_dir"] / "config.json").read_text())["config"]["release_tolerance"]
    assert (
        kept_mib - 1 <= kvc["residual_vs_load_mib"] <= kept_mib + tolerance * kvc["idle_before_workload_mib"]
    )
    md = (full_run["run_dir"] / "summary.md").read_text()
    after_bursts = next(line for line in md.splitlines() if line.startswith("Device memory above its level"))
    # the kvcached arm started fresh; shared_kvcached reused its A, whose level after load held its pages
    assert "): kvcached " in after_bursts and "; shared_kvcached * " in after_bursts, after_bursts
    single = full_run["summary"]["comparison"]["single"]["figures"]
    assert single["static"]["idle_after_load_mib"] == static["idle_after_load_mib"]
    assert single["kvcached"]["idle_after_load_mib"] == kvc["idle_after_load_mib"]
    headline = json.loads(full_run["proc"].stdout.strip().splitlines()[-1])
    assert headline["idle_saving_mib"] == pytest.approx(
        static["idle_after_load_mib"] - kvc["idle_after_load_mib"]
    )


def rows_per_burst(full_run, server):
    """For a failure message: rows in shared_kvcached's requests.jsonl per burst of the server, and what
    the harness said of those bursts."""
    (exp_dir,) = full_run["run_dir"].glob("*_shared_kvcached")
    rows = [r for r in rx.read_jsonl(exp_dir / "requests.jsonl") if r["server"] == server]
    section = full_run["proc"].stdout.split("=== shared_kvcached:", 1)[-1].split("===", 1)[0]
    said = [line.strip() for line in section.splitlines() if line.strip().startswith(f"{server} burst")]
    return (
        f"rows in requests.jsonl: { {p: sum(r['phase'] == p for r in rows) for p in sorted({r['phase'] for r in rows})} }"  # noqa: E501
        f"; the harness said: {said}"
    )


def test_two_model_runs_attribute_memory_per_model(full_run):
    shared = full_run["summary"]["experiments"]["shared_kvcached"]
    for name in "AB":
        server = shared["servers"][name]
        assert server["memory"]["idle_before_workload_mib"] > 500  # weights, in the engine child
        assert server["memory"]["flex_mib"] > 10  # its own bursts
        assert server["kvcached"]["peak_used_mib"] > 10
        assert server["vllm"]["max_running"] >= 1
        assert server["latency"]["failed"] == 0 and server["latency"]["ok"] == 16, rows_per_burst(
            full_run, name
        )
    assert shared["servers"]["A"]["reused"], "kvcached A is reused from the single-model experiment"
    table = (
        (full_run["run_dir"] / "summary.md")
        .read_text()
        .split("| experiment | idle after load", 1)[1]
        .split("\n\n")[0]
    )
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines()[2:]}
    # a reused server was not freshly loaded, and the table says so where its idle level is shown
    assert rows["shared_kvcached"].endswith(" *") and not rows["kvcached"].endswith("*"), rows
    assert (
        "A server reused from an earlier experiment was not freshly loaded"
        in (full_run["run_dir"] / "summary.md").read_text()
    )
    starts = full_run["summary"]["server_starts"]
    # 10 servers across the six experiments; A and B kvcached and A static are reused: 6 start-ups
    assert (starts["started"], starts["reused"]) == (6, 4) and starts["startup_s_saved"] > 0
    static_pair = full_run["summary"]["experiments"]["shared_static"]["servers"]
    assert static_pair["B"]["memory"]["idle_before_workload_mib"] == pytest.approx(
        0.35 * CARD_MIB + 300, rel=0.01
    )


def test_overload_static_pair_queues_and_elastic_pair_stays_in_budget(full_run):
    exps = full_run["summary"]["experiments"]
    static_a = exps["overload_static"]["servers"]["A"]
    assert static_a["vllm"]["max_waiting"] > 0, "the burst needs more than its static share"
    elastic = exps["overload_kvcached"]
    budget_mib = 0.25 * 1024
    assert all(v / 2**20 <= budget_mib for v in elastic["kv_limits_bytes"].values())
    assert elastic["servers"]["A"]["kvcached"]["peak_used_mib"] > budget_mib / 2  # above the static share
    ratios = full_run["summary"]["comparison"]["overload"]["per_phase"]
    assert set(ratios) == {"A bursts, B idle", "B bursts, A idle"}


def test_memory_held_while_serving_is_reported_per_strategy_and_per_model(full_run):
    summary, md = full_run["summary"], (full_run["run_dir"] / "summary.md").read_text()
    for name, exp in summary["experiments"].items():
        cost, device = exp["memory_cost"], exp["device"]
        assert device["idle_before_workload_mib"] - 1 <= cost["mean_mib"] <= cost["peak_mib"] + 1e-6, name
        assert cost["peak_mib"] <= device["peak_mib"] + 1e-6 and cost["p95_mib"] <= cost["peak_mib"], name
        assert cost["gib_hours"] == pytest.approx(cost["mean_mib"] / 1024 * cost["workload_s"] / 3600), name
        assert all(s["memory_cost"]["mean_mib"] > 0 for s in exp["servers"].values()), name
    static, kvcached = (summary["experiments"][n]["memory_cost"]["mean_mib"] for n in ("static", "kvcached"))
    assert kvcached < static, "the elastic pool holds less while serving these bursts"
    assert "Memory held while serving" in md and "| kvcached |" in md
    headline = json.loads(full_run["proc"].stdout.strip().splitlines()[-1])["experiments"]["kvcached"]
    assert headline["gib_hours"] == pytest.approx(
        summary["experiments"]["kvcached"]["memory_cost"]["gib_hours"], rel=1e-5
    )


def test_results_layout_and_plots(full_run):
    run_dir = full_run["run_dir"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["gpu"]["name"] == "Tesla T4 (fake)"
    assert config["servers"] and all("cmd_shell" in s for s in config["servers"].values())
    static_env = next(s["env"] for s in config["servers"].values() if "static" in s["label"])
    assert static_env["ENABLE_KVCACHED"] == "false"
    assert static_env["CUDA_VISIBLE_DEVICES"] == config["gpu"]["uuid"]  # the card NVML measures
    for exp in ("01_kvcached", "04_static"):
        for name in ("requests.jsonl", "memory.jsonl", "summary.json", "experiment.json"):
            assert (run_dir / exp / name).stat().st_size > 0
    assert list((run_dir / "01_kvcached").glob("server_*.log"))
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert {p.name for p in plots} == {
        "vram_single_model.png",
        "latency.png",
        "shared_memory.png",
        "overload_memory.png",
        "footprint.png",
    }
    for plot in plots:
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "| kvcached |" in (run_dir / "summary.md").read_text()


def test_nothing_is_left_running(full_run):
    states = list(full_run["gpu_dir"].glob("*.json"))
    assert not [p for p in states if alive(int(p.stem))]


def test_report_rebuilds_the_same_summary_offline(full_run):
    base = full_run["base"]
    copy = base / "report" / full_run["run_dir"].name
    assert (base / "report.rc").read_text() == "0", (base / "report.err").read_text()[-3000:]
    rebuilt = json.loads((copy / "summary.json").read_text())
    assert rebuilt.pop("plots") == [], "--report --no-plots draws none (the run itself drew them)"
    assert rebuilt == {k: v for k, v in full_run["summary"].items() if k != "plots"}
    assert "Plots: none drawn" in (copy / "summary.md").read_text()
    assert json.loads((base / "report.out").read_text().strip().splitlines()[-1])["run_dir"] == str(copy)


# --- other whole runs, in the background ---------------------------------------------------------
@background("failed_experiment_run", weight=5)
def failed_experiment_cmd(base):
    (base / "gpu").mkdir()
    # the kvcached server crashes while starting (its arm's environment tells the fake so)
    args = script_args(base / "results", "--experiments", "1,2", "--kvcached-env", "FAKE_MODE=crash")
    return dict(args=args, env=fake_env(base / "gpu"), timeout=120)


@pytest.fixture
def failed_experiment_run(background_runs):
    return background_runs.result("failed_experiment_run")


def test_failed_experiment_is_recorded_and_the_others_run(failed_experiment_run):
    proc, base = failed_experiment_run
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run_dir,) = (base / "results").iterdir()
    error = json.loads((run_dir / "01_kvcached" / "error.json").read_text())
    assert "exited with code 3" in error["error"] and "last 40 lines" in error["error"]
    assert "fake start-up failure" in error["error"]
    assert json.loads((run_dir / "02_static" / "summary.json").read_text())["latency"]["failed"] == 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["failed"] == ["01_kvcached"]


@background("repeats_run", weight=8.5)
def repeats_cmd(base):
    (base / "gpu").mkdir()
    args = script_args(
        base / "results", "--experiments", "5", "--repeats", "2", "--no-warmup", "--max-tokens", "16"
    )
    return dict(args=args, env=fake_env(base / "gpu"), timeout=180)


@pytest.fixture
def repeats_run(background_runs):
    return background_runs.result("repeats_run")


def test_repeats_report_the_spread_of_elastic_static_ratios(repeats_run):
    proc, base = repeats_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run_dir,) = (base / "results").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    phase = summary["comparison"]["overload"]["per_phase"]["A bursts, B idle"]
    assert phase["over_repeats"]["kvcached/static"]["ttft_s_p99"]["n"] == 2
    assert summary["experiments"]["overload_static"]["repeats"]["ttft_s_p50"]["n"] == 2
    assert "repeats:" in (run_dir / "summary.md").read_text()
    assert sorted(p.name for p in run_dir.glob("plan_*")) == [  # main: every schedule is resolved with it
        "plan_main.json.gz",
        "plan_overload_A.json.gz",
        "plan_overload_B.json.gz",
    ]


@background("notebook_run", weight=11)
def notebook_cmd(base):
    (base / "gpu").mkdir()
    source = (ROOT / "run_experiments.py").read_text()
    notebook_args = " ".join(
        json.dumps(a) if " " in a else a for a in script_args(base / "results", "--experiments", "1")[2:]
    )
    patched = source.replace('NOTEBOOK_ARGS = "--preset auto"', f"NOTEBOOK_ARGS = {notebook_args!r}")
    # the third run's cell asks for 50 bursts: the stop button surely lands while it is still bursting
    long = source.replace(
        'NOTEBOOK_ARGS = "--preset auto"', f"NOTEBOOK_ARGS = {notebook_args + ' --bursts 50'!r}"
    )
    # Three executions of the cell in one kernel, as a user would: run, run again, then press the stop
    # button (SIGINT, the kernel's interrupt) once the third run's first requests are done.
    driver = (
        "import glob, os, signal, sys, threading, time, types\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # what a notebook kernel has\n"
        "sys.modules['ipykernel'] = types.ModuleType('ipykernel')\n"
        "sys.argv = ['ipykernel_launcher.py', '-f', '/root/.local/share/jupyter/runtime/kernel-1.json']\n"
        # IPython keeps each cell's source in linecache, where inspect finds a function's source
        "import linecache\n"
        "def compiled(path, name):\n"
        "    source = open(path).read()\n"
        "    linecache.cache[name] = (len(source), None, source.splitlines(True), name)\n"
        "    return compile(source, name, 'exec')\n"
        f"cell = compiled({str(base / 'cell.py')!r}, '<ipython-input-1-cell>')\n"
        f"long = compiled({str(base / 'cell_long.py')!r}, '<ipython-input-2-cell>')\n"
        "for run in range(3):\n"
        "    if run == 2:\n"
        "        def stop_button():\n"
        f"            while len(glob.glob({str(base / 'results' / '*' / '01_*' / 'requests.jsonl')!r})) < 3:\n"  # noqa: E501
        "                time.sleep(0.02)\n"
        "            print('STOP BUTTON', signal.getsignal(signal.SIGINT), flush=True)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        threading.Thread(target=stop_button, daemon=True).start()\n"
        "    exec(long if run == 2 else cell, {'__name__': '__main__'})\n"
        "    print('CELL DONE', run)\n"
        "deadline = time.time() + 10\n"
        "def left():\n"
        "    main = threading.main_thread()\n"
        "    return [t.name for t in threading.enumerate() if not t.daemon and t is not main]\n"
        "while time.time() < deadline and left():\n"
        "    time.sleep(0.1)\n"
        "print('LEFT THREADS', left())\n"
    )
    (base / "cell.py").write_text(patched)
    (base / "cell_long.py").write_text(long)
    return dict(
        args=[sys.executable, "-c", driver],
        env=fake_env(base / "gpu"),
        cwd=str(base),
        timeout=120,
        patched=patched != source,
    )


@pytest.fixture
def notebook_run(background_runs):
    return background_runs.result("notebook_run") + (background_runs.extra("notebook_run")["patched"],)


def test_notebook_mode_uses_notebook_args_and_ignores_kernel_argv(notebook_run):
    proc, base, patched = notebook_run
    assert patched, "the cell's NOTEBOOK_ARGS line was found and set"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(f"CELL DONE {n}" in proc.stdout for n in range(3)), (
        "main() must return, not sys.exit, in a notebook"
    )
    assert "LEFT THREADS []" in proc.stdout
    first, second, stopped = sorted((base / "results").iterdir())
    for run_dir in (first, second):
        assert json.loads((run_dir / "summary.json").read_text())["experiments"]["kvcached"]["memory_valid"]
    assert json.loads((stopped / "config.json").read_text())["interrupted"] is True, proc.stdout[-3000:]
    assert "This run was interrupted" in (stopped / "summary.md").read_text()
    engines = [int(p.stem) for p in (base / "gpu").glob("*.json") if p.stem.isdigit()]
    assert not any(alive(pid) for pid in engines), "the stop button leaves no server behind"


def test_a_report_names_a_torn_or_missing_raw_file_instead_of_reporting_fewer_requests(tmp_path):
    exp_dir = tmp_path / "01_kvcached"
    exp_dir.mkdir()
    marks = rx.Marks(idle_after_load=(1.0, 2.0), bursts=[rx.BurstMark("burst 1", "A", 0, 3.0, 4.0)])
    rx.write_json(exp_dir / "experiment.json", rx.ExperimentRecord("kvcached", "?", marks=marks))
    row = json.dumps({"server": "A", "phase": "burst 1", "repeat": 0, "burst": 0, "t_send": 3.5, "ok": True})
    (exp_dir / "requests.jsonl").write_text(f"{row}\n{row}\n{row[:9]}")  # cut mid-line, as a full disk does
    loaded = rx.load_experiment(exp_dir)
    assert len(loaded.requests) == 2
    assert loaded.problems == [
        "memory.jsonl is missing: none of its rows is reported",
        "requests.jsonl: 1 of 3 lines could not be read (torn)",
    ]
    marks.bursts.clear()  # stopped before its first burst: no request to read
    rx.write_json(exp_dir / "experiment.json", rx.ExperimentRecord("kvcached", "?", marks=marks))
    (exp_dir / "requests.jsonl").unlink()
    assert rx.load_experiment(exp_dir).problems == ["memory.jsonl is missing: none of its rows is reported"]


def test_a_damaged_raw_file_is_read_up_to_the_damage_and_said(tmp_path):
    rows = [{"kind": "device", "t": float(t), "used_mib": 1.0} for t in range(400)]
    packed = rx.gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "memory.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # a copy cut short
    said: list[str] = []
    read = rx.read_jsonl(tmp_path / "memory.jsonl", said)
    assert 0 < len(read) < 400 and read == rows[: len(read)]
    assert said and said[0].startswith("memory.jsonl could not be read to its end"), said
    line = json.dumps({"server": "A", "ok": True})
    (tmp_path / "requests.jsonl").write_bytes(f"{line}\n".encode() + b'{"server": "\xff"}\n[1, 2]\n')
    said.clear()
    assert rx.read_jsonl(tmp_path / "requests.jsonl", said) == [
        {"server": "A", "ok": True},
        {"server": "\ufffd"},
    ]
    assert said == ["requests.jsonl: 1 of 3 lines could not be read (torn)"], "a row that is no object"
    (tmp_path / "other.jsonl").mkdir()
    said.clear()
    assert rx.read_jsonl(tmp_path / "other.jsonl", said) == [] and "could not be read" in said[0]


def test_a_report_leaves_out_an_experiment_whose_record_is_damaged_and_says_why(tmp_path):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    first, *others = sorted(p for p in copy.iterdir() if p.is_dir() and p.name[:2].isdigit())
    record = json.loads((first / "experiment.json").read_text())
    record["marks"]["bursts"] = 5  # a hand-edited or damaged record: a number where its bursts were
    (first / "experiment.json").write_text(json.dumps(record))
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["failed"][first.name].startswith("its files could not be read into a summary (TypeError")
    assert len(summary["experiments"]) == len(others), "the others are reported"


def test_a_report_leaves_out_a_row_that_is_not_a_request_and_keeps_the_experiment(tmp_path):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    first = sorted(p for p in copy.iterdir() if p.is_dir() and p.name[:2].isdigit())[0]
    rows = first / "requests.jsonl"
    if not rows.exists():  # committed runs keep it gzipped
        rows.write_bytes(gzip.decompress((first / "requests.jsonl.gz").read_bytes()))
        (first / "requests.jsonl.gz").unlink()
    total = len(rows.read_text().splitlines())
    with rows.open("a") as f:
        f.write('{"a": 1}\n{"server": "A", "phase": "burst 1", "repeat": null, "burst": 0, "t_send": 1.0}\n')
        f.write('{"server": "A"}\n')  # one field of a request only
        f.write('{"server": "A", "phase": "p", "repeat": 0, "burst": 0, "t_send": 1.0, "e2e_s": "x"}\n')
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    summary = json.loads((copy / "summary.json").read_text())
    assert not summary["failed"], summary["failed"]
    name = re.sub(r"^\d+_", "", first.name)
    assert summary["experiments"][name]["latency"]["requests"] == total
    assert (
        f"requests.jsonl: 4 of {total + 4} rows are not requests"
        in summary["experiments"][name]["problems"][0]
    )


def test_a_comparison_with_an_arm_cut_short_says_so_beside_its_ratios(tmp_path):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    (static,) = [p for p in copy.iterdir() if p.name.endswith("_static")]
    record = json.loads((static / "experiment.json").read_text())
    record["finished"] = False  # a Ctrl-C during its last burst
    (static / "experiment.json").write_text(json.dumps(record))
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    md = (copy / "summary.md").read_text()
    one_model = md.split("**One model:**", 1)[1].split("\n\n", 2)
    assert one_model[1].startswith("These ratios include static, cut short before its end"), one_model


def test_a_report_reads_a_config_json_without_its_fields_of_the_wrong_kind_and_says_which(tmp_path):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config.update(servers=1, lanes="x")  # a damaged or hand-edited file
    config["config"]["release_tolerance"] = "5%"
    (copy / "config.json").write_text(json.dumps(config))
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    assert json.loads((copy / "summary.json").read_text())["problems"] == [
        "config.json: servers, lanes, config.release_tolerance of the wrong kind, left out (defaults used)"
    ]


def test_a_report_leaves_out_entries_of_the_wrong_kind_inside_config_and_record(tmp_path):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    first_server = next(iter(config["servers"]))
    config["servers"][first_server] = 1  # a damaged or hand-edited file
    config.update(gpus=[1], model_runner_env={"x": 1})
    (copy / "config.json").write_text(json.dumps(config))
    first = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    record = json.loads((first / "experiment.json").read_text())
    (first / "experiment.json").write_text(json.dumps(dict(record, gpu_index=[0])))
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["problems"] == [
        "config.json: entries of servers, entries of gpus of the wrong kind, left out (defaults used)"
    ]
    assert record["name"] in summary["experiments"] and not summary["failed"]


def test_a_stop_during_the_notebook_display_keeps_the_report_and_its_exit_code(tmp_path, monkeypatch):
    def display(_):
        raise KeyboardInterrupt  # the notebook's stop button while the summary is drawn

    shown = types.SimpleNamespace(display=display, Markdown=str, Image=str)
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(display=shown))
    monkeypatch.setitem(sys.modules, "IPython.display", shown)
    monkeypatch.setattr(rx, "running_in_notebook", lambda: True)
    copy, said = rebuildable_copy(REPORT_CLI_RUN, tmp_path), []
    assert rx.main(["--report", str(copy), "--no-plots"], out=said.append) == 0
    assert f"display stopped; the summary and plots are in {copy}" in said
    assert (copy / "summary.md").exists()


def test_a_report_names_damaged_timing_records_and_plot_places_instead_of_a_traceback(tmp_path, capsys):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["timing"]["table_start"] = "x"  # each of these ended the report in a traceback
    config["config"]["idle_window_s"] = "1 s"
    (copy / "config.json").write_text(json.dumps(config))
    first, second, *_ = sorted(p for p in copy.iterdir() if p.is_dir())
    for folder, where, key in ((first, ("servers",), "startup_s"), (second, ("marks", "bursts"), "repeat")):
        record = json.loads((folder / "experiment.json").read_text())
        entries = record[where[0]] if len(where) == 1 else record[where[0]][where[1]]
        entries[0][key] = "x"
        (folder / "experiment.json").write_text(json.dumps(record))
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["problems"] == [
        "config.json: timing, config.idle_window_s of the wrong kind, left out (defaults used)"
    ]
    assert summary["failed"][first.name].endswith("(TypeError: servers: a startup_s of the wrong kind (str))")
    assert summary["failed"][second.name].endswith(
        "(TypeError: marks.bursts: a repeat of the wrong kind (str))"
    )
    assert rx.mean([1e308, 1e308]) == 1e308, "two damaged rows' sum overflowed"
    (copy / "plots").write_text("")
    assert rx.main(["--report", str(copy)], out=lambda _: None) == 2
    assert "cannot write" in capsys.readouterr().err


def test_a_report_that_cannot_write_an_experiments_summary_says_so_and_sigterm_ends_it_as_ctrl_c(
    tmp_path, monkeypatch, capsys
):
    # the write's OSError was named "its files could not be read"; SIGTERM killed it without a word (143)
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    first = sorted(p for p in copy.iterdir() if p.is_dir())[0]
    (first / "summary.json").unlink()
    (first / "summary.json").mkdir()
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 2
    assert f"cannot write {first / 'summary.json'} (Is a directory)" in capsys.readouterr().err

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises here

    monkeypatch.setattr(rx, "build_report", terminated)
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 130
    assert "interrupted before anything was measured; run --report" in capsys.readouterr().err


def test_a_report_whose_summary_is_a_folder_says_to_move_it_aside(tmp_path, capsys):
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    (copy / "summary.md").mkdir()
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 2
    assert f"cannot write {copy / 'summary.md'} (Is a directory); move it aside" in capsys.readouterr().err


def test_in_a_notebook_main_takes_its_flags_as_one_string_and_a_report_is_shown_inline(
    tmp_path, monkeypatch, capsys
):
    assert rx.main("--bursts abc", out=lambda _: None) == 2, "as a list's, not one flag per character"
    assert "--bursts" in capsys.readouterr().err
    shown = []
    monkeypatch.setattr(rx, "running_in_notebook", lambda: True)
    monkeypatch.setattr(rx, "show_in_notebook", shown.append)
    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    assert rx.main(f"--report {copy} --no-plots", out=lambda _: None) == 0
    assert shown == [copy], "as a run's summary is, at its end"


def test_a_report_on_a_full_disk_says_to_free_space_not_to_move_a_file(tmp_path, monkeypatch, capsys):
    def full(*args):
        raise OSError(rx.errno.ENOSPC, "No space left on device")

    copy = rebuildable_copy(REPORT_CLI_RUN, tmp_path)
    monkeypatch.setattr(rx, "write_text_atomic", full)
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 2
    assert "(No space left on device); free some space, then --report again" in capsys.readouterr().err

    figure = types.SimpleNamespace(tight_layout=lambda: None, savefig=full)  # the plots on a full disk too
    with pytest.raises(rx.ReportError, match="free some space, then --report again"):
        rx.save_figure(figure, tmp_path / "plots" / "latency.png")

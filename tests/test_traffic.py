"""Traffic closer to real use: decode-length mixes, per-token latency, goodput under SLOs, a CSV."""

import csv
import dataclasses
import gzip
import json
import re
import shutil
import threading
import time
import types

import pytest
from conftest import FAST, background, fake_env, in_process_args, rx, script_args, succeeded_run


def test_output_lengths_follow_the_distribution_and_keep_the_prompts():
    fixed = rx.plan_workload(rx.Config(max_tokens=64), 200, "x", bursts=1, prompt_tokens=100)
    mixed = rx.plan_workload(
        rx.Config(max_tokens=64, output_tokens_dist="uniform:16-128"), 200, "x", bursts=1, prompt_tokens=100
    )
    lengths = [r.max_tokens for r in mixed.requests]
    assert {r.max_tokens for r in fixed.requests} == {64}
    assert min(lengths) >= 16 and max(lengths) <= 128 and len(set(lengths)) > 50
    assert [r.prompt for r in fixed.requests] == [r.prompt for r in mixed.requests], "same seed, same prompts"
    assert lengths == [
        r.max_tokens
        for r in rx.plan_workload(
            rx.Config(max_tokens=64, output_tokens_dist="uniform:16-128"),
            200,
            "x",
            bursts=1,
            prompt_tokens=100,
        ).requests
    ]
    lognormal = rx.plan_workload(
        rx.Config(max_tokens=512, output_tokens_dist="lognormal:64,0.5"),
        2000,
        "x",
        bursts=1,
        prompt_tokens=100,
    )
    mean = sum(r.max_tokens for r in lognormal.requests) / 2000
    assert 58 < mean < 70


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(output_tokens_dist="uniform:0-5"), "--output-tokens-dist"),
        (dict(output_tokens_dist="lognormal:64"), "--output-tokens-dist"),
        (dict(output_tokens_dist="poisson:3"), "--output-tokens-dist"),
        (dict(output_tokens_dist="uniform:16-4000"), "no room for the prompt"),
        (dict(slo_ttft_ms=-1.0), "--slo-ttft-ms"),
    ],
)
def test_bad_traffic_flags_are_refused_naming_the_flag(flags, message):
    with pytest.raises(rx.ConfigError, match=message):
        rx.validate_config(rx.Config(**flags))


def test_a_length_mix_turns_on_ignore_eos_so_the_lengths_are_exact():
    cfg = rx.resolve_config(rx.Config(output_tokens_dist="uniform:4-32"))
    assert cfg.ignore_eos


def test_goodput_counts_failures_and_each_objective():
    # TPOT is derived from each row's times: (e2e - ttft) / (tokens - 1) = 0.01, 0.01, 0.05, 0.01 s
    rows = [
        {"ok": True, "ttft_s": 0.1, "e2e_s": 0.2, "completion_tokens": 11},
        {"ok": True, "ttft_s": 0.3, "e2e_s": 0.4, "completion_tokens": 11},
        {"ok": True, "ttft_s": 0.1, "e2e_s": 0.6, "completion_tokens": 11},
        {"ok": False, "ttft_s": 0.1, "e2e_s": 0.2, "completion_tokens": 11},
    ]
    assert rx.goodput(rows, 200, 0).met == 2
    both = rx.goodput(rows, 200, 20)
    assert (both.met, both.of, both.share) == (1, 4, 0.25)
    assert rx.goodput(rows, 0, 0) is None


def test_the_goodput_column_shows_a_share_or_says_there_is_none():
    def summary(share, met, of):
        good = rx.Goodput(1000, 100, met, of, share)
        return types.SimpleNamespace(latency=types.SimpleNamespace(itl_s=None, tpot_s=None, goodput=good))

    table = "\n".join(rx.per_token_table({"kvcached": summary(0.5, 1, 2), "static": summary(None, 0, 0)}))
    assert "| kvcached | n/a | n/a | 50.0% (1/2) |" in table
    assert "| static | n/a | n/a | n/a (0/0) |" in table


def test_an_open_loop_warm_up_sends_the_first_window_with_arrivals_at_once(monkeypatch, tmp_path):
    # window 1 planned nothing (a low rate), window 2 three arrivals: the warm-up sends those three
    requests = tuple(rx.PlannedRequest(1, i, "p", 4, 0.0, offset_s=0.5 + i) for i in range(3))
    plan = rx.WorkloadPlan(2, 3, 0.0, 4, 0, 0.0, 0, "", requests, arrivals="poisson", rates=(0.01, 2.0))
    sent = []

    def run_step(trial, step, repeat, sink, gate, plan):
        sent.append(plan.burst(step.burst))
        return [types.SimpleNamespace(status=200, ok=True) for _ in sent[-1]]  # each request's record

    monkeypatch.setattr(rx, "run_step", run_step)
    server = types.SimpleNamespace(warmed=set(), spec=types.SimpleNamespace(label="A", sleep_mode=False))
    steps = (rx.Step("window 1", "A", "main", 0),)
    trial = types.SimpleNamespace(
        cfg=rx.Config(), servers={"A": server}, exp=types.SimpleNamespace(steps=steps), plans={"main": plan}
    )
    trial.folder = tmp_path
    assert rx.warm_up(trial)
    assert [(r.index, r.offset_s) for r in sent[0]] == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert not rx.warm_up(trial) and len(sent) == 1, "warm for this shape already: not again"
    trial.exp = types.SimpleNamespace(steps=(rx.Step("A bursts", "A", "overload_A", 0),))
    trial.plans["overload_A"] = plan
    assert rx.warm_up(trial) and len(sent) == 2, "a shape it has not served yet is warmed up too"
    server.warmed.clear()
    trial.exp = types.SimpleNamespace(steps=steps)
    trial.plans = {"main": dataclasses.replace(plan, requests=())}
    assert not rx.warm_up(trial), "nothing planned at all: nothing sent"


def test_token_gaps_are_pooled_over_requests():
    rows = [
        {
            "ok": True,
            "t_send": 0.0,
            "e2e_s": 1.0,
            "ttft_s": 0.1,
            "completion_tokens": 3,
            "itl_s": [0.01, 0.03],
        },
        {"ok": True, "t_send": 0.0, "e2e_s": 1.0, "ttft_s": 0.1, "completion_tokens": 2, "itl_s": [0.02]},
        {"ok": False, "t_send": 0.0, "e2e_s": 1.0, "itl_s": [9.0]},
    ]
    summary = rx.latency_summary(rows)
    assert summary.itl_s.n == 3 and summary.itl_s.p50 == pytest.approx(0.02) and summary.itl_s.max == 0.03


def test_a_length_mix_with_slos_end_to_end(secrets_and_length_mix_run):
    proc, _, run = secrets_and_length_mix_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exp = run / "01_kvcached"
    rows = rx.read_jsonl(exp / "requests.jsonl")
    plan = json.loads(__import__("gzip").decompress((run / "plan_main.json.gz").read_bytes()))
    planned = {(r["burst"], r["index"]): r["max_tokens"] for r in plan["requests"]}
    assert all(r["ok"] and r["completion_tokens"] == planned[(r["burst"], r["index"])] for r in rows)
    assert len({r["completion_tokens"] for r in rows}) > 3, "the responses end at different times"
    summary = json.loads((run / "summary.json").read_text())["experiments"]["kvcached"]
    good = summary["latency"]["goodput"]
    # a TTFT is a round trip, never a microsecond, while a TPOT can be near 0 if a busy client reads
    # every token at once: only the TTFT objective is sure to be missed, however loaded the machine
    assert good["of"] == len(rows) and good["met"] == 0, "no request meets a 1 microsecond TTFT"
    assert summary["latency"]["itl_s"]["n"] > len(rows)
    md = (run / "summary.md").read_text()
    assert "goodput = requests completed with TTFT <= 0.001 ms and TPOT <= 10000 ms" in md
    assert "| kvcached | " in md and f"0.0% (0/{len(rows)}) |" in md
    with open(exp / "requests.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["completion_tokens"] and "itl_p50_s" in table[0]


# --- open-loop arrivals ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(arrivals="uniform", rate=2.0), "--arrivals"),
        (dict(arrivals="poisson", rate=-1.0), "--rate"),
        (dict(arrivals="poisson"), "needs --rate"),
        (dict(arrivals="poisson", rates="2,-4"), "--rates"),
        (dict(arrivals="poisson", rates="2,x"), "--rates"),
        (dict(arrivals="gamma", rate=2.0, burstiness=0.0), "--burstiness"),
        (dict(rate=4.0), "--arrivals poisson"),
    ],
)
def test_bad_arrival_flags_are_refused_naming_the_flag(flags, message):
    with pytest.raises(rx.ConfigError, match=message):
        rx.validate_config(rx.Config(**flags))


def arrival_gaps(plan, window=0):
    offsets = [r.offset_s for r in plan.burst(window)]
    return offsets, [b - a for a, b in zip(offsets, offsets[1:])]


def test_poisson_and_gamma_arrivals_are_planned_at_the_rate_and_seeded():
    cfg = rx.Config(arrivals="poisson", rates="5,20", duration_s=200, prompt_tokens=64, max_tokens=16)
    plan = rx.open_loop_plan(cfg, "x")
    assert plan.bursts == 2 and plan.rates == (5.0, 20.0)
    for window, rate in enumerate(plan.rates):
        offsets, gaps = arrival_gaps(plan, window)
        assert offsets == sorted(offsets) and 0 < offsets[0] and offsets[-1] < 200
        assert len(offsets) == pytest.approx(rate * 200, rel=0.1)
        assert (sum((g - sum(gaps) / len(gaps)) ** 2 for g in gaps) / len(gaps)) ** 0.5 / (
            sum(gaps) / len(gaps)
        ) == pytest.approx(1.0, abs=0.1), "exponential gaps: coefficient of variation 1"
    assert rx.open_loop_plan(cfg, "x") == plan
    bursty = rx.open_loop_plan(
        rx.Config(
            arrivals="gamma", rate=10, burstiness=0.25, duration_s=200, prompt_tokens=64, max_tokens=16
        ),
        "x",
    )
    _, gaps = arrival_gaps(bursty)
    mean = sum(gaps) / len(gaps)
    assert (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean == pytest.approx(2.0, rel=0.2)


def test_each_model_gets_arrivals_of_its_own_at_its_own_rate_sent_all_at_once():
    cfg = rx.Config(
        models="m1,m2,m3",
        arrivals="poisson",
        rates_per_model="2,8,4",
        bursts=2,
        duration_s=200,
        max_tokens=16,
    )
    plans = [rx.open_loop_plan(cfg, "x", position) for position in range(3)]
    for plan, rate in zip(plans, (2, 8, 4)):
        assert plan.rates == (rate, rate) and plan.bursts == 2
        assert len(plan.burst(1)) == pytest.approx(rate * 200, rel=0.15)
    assert arrival_gaps(plans[0])[0] != arrival_gaps(plans[2])[0][: len(arrival_gaps(plans[0])[0])]
    assert rx.per_model_family(cfg) == "open" and rx.per_model_family(rx.Config(arrivals="poisson")) is None
    spec = rx.resolve_experiment(rx.experiment("shared_kvcached"), cfg, {"main": plans[0]}, 0)
    steps = [(s.phase, s.server, s.plan, s.burst) for s in spec.steps]
    assert steps == [("open 1", "*", "open", 0), ("open 2", "*", "open", 1)]
    assert spec.question == "3 models on one GPU, all elastic, rates of their own."


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rates-per-model", "2,4"], "--rates-per-model: apply to poisson or gamma arrivals"),
        (
            ["--arrivals", "poisson", "--rates-per-model", "2"],
            "--rates-per-model: must be one positive rate per model (2)",
        ),
        (
            ["--arrivals", "poisson", "--rates-per-model", "2,-1"],
            "--rates-per-model: must be one positive rate",
        ),
        (
            ["--arrivals", "poisson", "--rates-per-model", "2,4", "--rate", "3"],
            "--rates-per-model: give either",
        ),
    ],
)
def test_bad_per_model_rates_are_refused_naming_the_flag(flags, message, capsys):
    assert rx.main(flags, out=lambda _: None) == 2
    assert message in capsys.readouterr().err


# Open-loop arrivals the client can keep on two busy cores: near-regular gaps (gamma, shape 25) at 3
# and 6 requests a second, so that planned arrivals are at least MIN_GAP_S apart (checked on the plan).
# A send that waited for an earlier request (each streams for ~0.3 s), a pool too small or a plan read
# wrong would send after the next one was due.
OPEN_LOOP = ["--arrivals", "gamma", "--burstiness", "25", "--rates", "3,6", "--duration-s", "1.5"]
MIN_GAP_S = 0.1
# SLOs many times the fake's own times (8 ms a token, first token within ~30 ms), so that every request
# meets them however busy the machine: attainment and capacity are then known in advance
GENEROUS_SLOS = ["--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000"]


@background("open_loop_run", weight=7.5)
def open_loop_run_cmd(base):
    (base / "gpu").mkdir()
    return dict(
        args=script_args(base / "results", "--experiments", "1", *OPEN_LOOP, *GENEROUS_SLOS, "--plots"),
        env=fake_env(base / "gpu"),
    )


@pytest.fixture
def open_loop_run(background_runs):
    return succeeded_run(background_runs, "open_loop_run")


def test_open_loop_requests_go_out_at_their_planned_times(open_loop_run):
    plan = json.loads(gzip.decompress((open_loop_run / "plan_main.json.gz").read_bytes()))
    record = json.loads((open_loop_run / "01_kvcached" / "experiment.json").read_text())
    rows = rx.read_jsonl(open_loop_run / "01_kvcached" / "requests.jsonl")
    for window, mark in enumerate(record["marks"]["bursts"]):
        planned = {r["index"]: r["offset_s"] for r in plan["requests"] if r["burst"] == window}
        offsets = sorted(planned.values())
        assert len(offsets) >= 4 and min(b - a for a, b in zip(offsets, offsets[1:])) >= MIN_GAP_S
        mine = sorted((r for r in rows if r["burst"] == window), key=lambda r: planned[r["index"]])
        assert len(mine) == len(planned)
        # t_send is the planned arrival, from one start of the window
        starts = [r["t_send"] - planned[r["index"]] for r in mine]
        assert max(starts) - min(starts) < 1e-3 and mark["start"] <= min(starts)
        # each one sent when it was due: not before its planned arrival, and before the next one's
        assert all(r["send_delay_s"] >= 0 for r in mine)
        sent = [planned[r["index"]] + r["send_delay_s"] for r in mine]
        assert all(s < due for s, due in zip(sent, offsets[1:])), "each one sent when it was due"
        assert mark["end"] - mark["start"] >= offsets[-1], "the window lasts as long as its arrivals"
    summary = json.loads((open_loop_run / "summary.json").read_text())["experiments"]["kvcached"]
    sweep = summary["rate_sweep"]
    assert [p["rate"] for p in sweep] == [3, 6]
    assert [p["requests"] for p in sweep] == [sum(r["burst"] == w for r in plan["requests"]) for w in (0, 1)]
    assert all(p["failed"] == 0 and p["goodput"] == 1.0 for p in sweep)
    assert [p["max_send_delay_s"] for p in sweep] == [
        max(r["send_delay_s"] for r in rows if r["burst"] == w) for w in (0, 1)
    ], "the sweep reports the latest send of each window"
    assert (
        "Open-loop arrivals (latency timed from each planned arrival)"
        in (open_loop_run / "summary.md").read_text()
    )
    assert (open_loop_run / "plots" / "rate_sweep.png").stat().st_size > 10_000


def test_an_open_loop_sweep_reports_capacity_within_the_slos_and_the_memory_held(open_loop_run):
    summary = json.loads((open_loop_run / "summary.json").read_text())["experiments"]["kvcached"]
    capacity = summary["capacity"]
    assert capacity["attainment"] == {"3": 1.0, "6": 1.0} and capacity["target"] == 0.99
    assert capacity["verdict"] == "above the sweep" and capacity["largest_held_rps"] == 6
    at_six = [p["mean_mib"] for p in summary["rate_sweep"] if p["rate"] == 6]
    assert capacity["mean_mib"] == pytest.approx(sum(at_six) / len(at_six))
    idle, peak = summary["device"]["idle_before_workload_mib"], summary["device"]["peak_mib"]
    assert all(idle <= p["mean_mib"] <= peak for p in summary["rate_sweep"]), "held while serving"
    md = (open_loop_run / "summary.md").read_text()
    assert "What one card takes within the SLOs (TTFT ≤ 5000 ms, TPOT ≤ 1000 ms)" in md
    assert "| kvcached | 100% | 100% | above the sweep (held every rate, up to 6 req/s) |" in md
    assert "At 99% attainment, kvcached held 6 requests/s (above the sweep), the card holding" in md
    assert "| kvcached | burst 2 | 6 req/s | " in md, "each window's rate, with its unit"
    assert (open_loop_run / "plots" / "attainment.png").stat().st_size > 10_000
    result = open_loop_run.parent.parent / "stdout.txt"
    headline = json.loads(result.read_text().strip().splitlines()[-1])["experiments"]["kvcached"]
    assert headline["capacity"]["verdict"] == "above the sweep" and headline["gib_hours"] > 0


def test_a_client_that_falls_behind_its_plan_is_flagged_in_the_summary(open_loop_run):
    summary = json.loads((open_loop_run / "summary.json").read_text())["experiments"]["kvcached"]
    rows = rx.read_jsonl(open_loop_run / "01_kvcached" / "requests.jsonl")
    late = summary["latency"]["send_delay_s"]["p99"]
    assert late == pytest.approx(rx.percentile([r["send_delay_s"] for r in rows], 99))
    # how late a busy machine sends is the benchmark's to measure: here, flagged exactly when too late
    flagged = any("not faithful" in p for p in summary["problems"])
    assert flagged == (late > rx.FAITHFUL_SEND_DELAY_S)
    assert "Send delay, how late requests went out after their planned arrival: kvcached p99" in (
        (open_loop_run / "summary.md").read_text()
    )

    def planned(delay):
        row = {"ok": True, "t_send": 0.0, "ttft_s": 0.1, "e2e_s": 0.5, "completion_tokens": 8}
        return [dict(row, index=i, send_delay_s=delay * i / 99) for i in range(100)]

    on_time, behind = rx.latency_summary(planned(0.04)), rx.latency_summary(planned(0.2))
    assert rx.unfaithful(on_time) == []
    (problem,) = rx.unfaithful(behind)
    assert problem.startswith("not faithful to its plan: requests went out a p99 of 198 ms after")
    closed = rx.latency_summary([dict(r, send_delay_s=None) for r in planned(0)])
    assert closed.send_delay_s is None and rx.unfaithful(closed) == [], "closed bursts have no plan times"


def point(rate, share, requests=100, mean_mib=None, repeat=0):
    return rx.RatePoint(f"{rate} req/s", repeat, rate, requests, 0, 0.1, 0.2, 1, 2, share, 0.0, mean_mib)


@pytest.mark.parametrize(
    "points, verdict, held, mib",
    [
        ([point(3, 1.0, mean_mib=10), point(6, 0.99, mean_mib=20), point(9, 0.9)], "within the sweep", 6, 20),
        ([point(3, 1.0), point(6, 0.995, mean_mib=30)], "above the sweep", 6, 30),
        ([point(3, 0.98, mean_mib=5), point(6, 1.0)], "below the sweep", None, None),
        # a miss ends it: a higher rate that happens to hold does not count
        ([point(3, 1.0), point(6, 0.5), point(9, 1.0)], "within the sweep", 3, None),
        # repeats of a rate are pooled by request: 10 of 10 and 97 of 100 is 97.3%
        ([point(3, 1.0), point(6, 1.0, 10, 40), point(6, 0.97, 100, 60, 1)], "within the sweep", 3, None),
        ([point(3, 1.0, 10, 40), point(3, 1.0, 30, 60, 1)], "above the sweep", 3, 50),
    ],
)
def test_capacity_is_the_largest_rate_held_with_every_lower_one(points, verdict, held, mib):
    capacity = rx.capacity(points, 0.99)
    assert (capacity.verdict, capacity.largest_held_rps, capacity.mean_mib) == (verdict, held, mib)


def test_a_rate_with_no_requests_is_neither_held_nor_missed_and_pooled_shares_are_exact():
    empty_first = rx.capacity([point(0.5, None, requests=0), point(1, 1.0), point(2, 1.0)], 0.99)
    assert (empty_first.verdict, empty_first.largest_held_rps) == ("above the sweep", 2)
    assert empty_first.attainment["0.5"] is None
    empty_between = rx.capacity([point(1, 1.0), point(2, None, requests=0), point(4, 1.0)], 0.99)
    assert (empty_between.verdict, empty_between.largest_held_rps) == ("above the sweep", 4)
    missed = rx.capacity([point(0.5, None, requests=0), point(1, 0.5), point(2, 1.0)], 0.99)
    assert rx.capacity_sentence("static", types.SimpleNamespace(capacity=missed)) == (
        "static missed it already at the lowest swept rate, 1 requests/s"
    )
    assert rx.capacity([point(0.5, None, requests=0)], 0.99) is None
    empty_top = rx.capacity([point(4, 1.0), point(8, 1.0), point(16, None, requests=0)], 0.99)
    assert (empty_top.verdict, empty_top.largest_held_rps) == ("within the sweep", 8), "16 was never tried"
    # 0 of 1 and 24 of 47 pool to 24 of 48: exactly the 50% target, not a float step below it
    halves = rx.capacity([point(3, 0.0, requests=1), point(3, 24 / 47, requests=47, repeat=1)], 0.5)
    assert halves.attainment == {"3": 0.5} and halves.verdict == "above the sweep"
    # 999 of 1,000 meets --slo-attainment 99.9, which the report divides by 100 (a hair above 0.999)
    exact = rx.capacity([point(2, 0.999, requests=1000), point(4, 0.998, requests=1000)], 99.9 / 100)
    assert (exact.verdict, exact.largest_held_rps) == ("within the sweep", 2)


def test_a_share_is_shown_rounded_down_so_a_missed_target_never_reads_as_met():
    assert [rx.percent(v) for v in (0.9899, 0.99, 0.29, 1.0, None)] == ["98.9%", "99%", "29%", "100%", "n/a"]


def test_a_run_from_before_marks_kept_their_unit_takes_it_from_its_arrivals():
    marks = rx.Marks(bursts=[rx.BurstMark("ramp 2", "*", 0, 1.0, rate=14.0), rx.BurstMark("b", "A", 0, 2.0)])
    rx.rates_as_reported(marks, "ramp", None)
    assert [b.rate_unit for b in marks.bursts] == [rx.RAMP_PEAK, None], "a closed burst has no rate"
    poisson = rx.Marks(bursts=[rx.BurstMark("4 req/s", "A", 0, 1.0, rate=4.0)])
    rx.rates_as_reported(poisson, "poisson", None)
    assert poisson.bursts[0].rate_unit is None, "requests/s"


def test_a_traces_window_is_reported_at_its_rate_scale_times_the_speedup():
    """Seen on an H100: 300 s of trace replayed in 30 s at scale 0.1 arrived at 0.92x the trace's own
    rate, and the report said 0.1x."""
    marks = rx.Marks(
        bursts=[rx.BurstMark(f"trace {i}", "*", 0, 1.0, rate=r) for i, r in ((1, 0.025), (2, 0.1))]
    )
    rx.rates_as_reported(marks, "trace", 10.0)
    assert [(b.rate, b.rate_unit) for b in marks.bursts] == [(0.25, rx.TRACE_SCALE), (1.0, rx.TRACE_SCALE)]
    assert rx.rate_words(marks.bursts[0].rate, rx.TRACE_SCALE) == "0.25x the trace"


def test_capacity_needs_slos_and_says_below_and_above_in_words():
    assert rx.capacity([point(3, None)], 0.99) is None and rx.capacity(None, 0.99) is None
    below = rx.capacity([point(3, 0.5), point(6, 0.2)], 0.99)
    assert below.attainment == {"3": 0.5, "6": 0.2}
    assert rx.capacity_words(below) == "below the sweep"
    summary = types.SimpleNamespace(capacity=below)
    assert rx.capacity_sentence("static", summary) == (
        "static missed it already at the lowest swept rate, 3 requests/s"
    )
    within = rx.capacity([point(3, 1.0, mean_mib=2048), point(6, 0.5)], 0.99)
    assert rx.capacity_words(within) == "3 req/s"
    assert rx.capacity_sentence("kvcached", types.SimpleNamespace(capacity=within)) == (
        "kvcached held 3 requests/s, the card holding 2,048 MiB on average"
    )
    assert rx.sweep_apart_words({"above the sweep"}, 3).startswith(
        " Every strategy was above the sweep, so this sweep does not tell them apart: raise the rates"
    )
    assert "lower the rates" in rx.sweep_apart_words({"below the sweep"}, 2)
    assert rx.sweep_apart_words({"above the sweep", "within the sweep"}, 2) == ""
    assert rx.sweep_apart_words({"above the sweep"}, 1) == "", "one strategy: nothing to tell apart"
    ramps = [dataclasses.replace(p, unit=rx.RAMP_PEAK) for p in (point(3, 1.0), point(6, 0.5))]
    assert rx.capacity_words(rx.capacity(ramps, 0.99)) == "peak 3 req/s"
    assert rx.rate_axis(ramps) == "each model's peak arrival rate (requests/s)"
    assert rx.rate_axis([point(3, 1.0)]) == "planned arrival rate (requests/s)"


def test_default_slos_apply_and_the_attainment_target_is_a_percentage():
    cfg = rx.Config()
    assert (cfg.slo_ttft_ms, cfg.slo_tpot_ms, cfg.slo_attainment) == (1000, 100, 99)
    for bad in (0, 101, -5):
        with pytest.raises(rx.ConfigError, match="--slo-attainment"):
            rx.validate_config(rx.Config(slo_attainment=bad))


# --- prefix caching with a shared prefix, and what each burst leaves behind --------------------------
def test_a_shared_prefix_goes_with_prefix_caching():
    cfg = rx.Config(prompt_tokens=300, max_tokens=16, prefix_caching=True, shared_prefix_tokens=100)
    prompts = [r.prompt for r in rx.plan_workload(cfg, 4, "x", bursts=2).requests]
    head = prompts[0].split("\n\n")[0]
    assert head.startswith("Shared: ") and len(head.split()) == 101
    assert all(p.startswith(head + "\n\n") for p in prompts) and len(set(prompts)) == len(prompts)
    assert "--enable-prefix-caching" in rx.server_command(cfg, rx.static_server(cfg, "A", 0.5))
    assert "--no-enable-prefix-caching" in rx.server_command(rx.Config(), rx.static_server(cfg, "A", 0.5))
    with pytest.raises(rx.ConfigError, match="add --prefix-caching"):
        rx.validate_config(rx.Config(shared_prefix_tokens=100))
    assert (
        rx.resolve_config(
            rx.validate_config(rx.Config(prefix_caching=True, shared_prefix_tokens=100))
        ).prompt_tokens
        == 768
    ), "the preset's prompt length counts"
    with pytest.raises(rx.ConfigError, match="--shared-prefix-tokens.*below the prompt length"):
        rx.resolve_config(rx.Config(prefix_caching=True, shared_prefix_tokens=900, prompt_tokens=768))


def test_with_prefix_caching_each_measured_repeat_starts_from_an_empty_cache(fake_gpu, tmp_path, monkeypatch):
    # the warm-up sends the first burst's prompts and a repeat sends them again: only the shared prefix may
    # be a hit, so each server's cache is emptied before the workload and before each repeat
    flags = [
        *FAST,
        "--experiments",
        "1",
        "--repeats",
        "2",
        "--prefix-caching",
        "--shared-prefix-tokens",
        "32",
    ]
    assert rx.main(in_process_args(tmp_path / "r", *flags), nvml_module=fake_gpu) == 0
    (run,) = (tmp_path / "r").iterdir()
    log = (run / "01_kvcached" / "server_A_kvcached.log").read_text()
    assert log.count("Resetting prefix cache") == 2, "before the workload, and before its second repeat"
    assert log.index("Resetting prefix cache") > log.index("POST /v1/chat/completions"), "after the warm-up"

    def refused(server, path, api_key):
        raise rx.ServerError(f"{path} on A answered HTTP 404")

    monkeypatch.setattr(rx, "sleep_call", refused)
    awake = types.SimpleNamespace(asleep=False)
    trial = types.SimpleNamespace(cfg=rx.Config(prefix_caching=True), servers={"A": awake})
    with pytest.raises(rx.ServerError, match="--prefix-caching: the cache was not emptied .* HTTP 404"):
        rx.forget_served_prompts(trial)  # the experiment fails: its numbers would count whole-prompt hits
    rx.forget_served_prompts(types.SimpleNamespace(cfg=rx.Config(), servers={"A": awake}))  # off: no call


def test_prefix_cache_counters_are_read():
    page = (
        'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0\n'
    )
    assert rx.parse_metrics(page) == {"prefix_queries": 1000.0, "prefix_hits": 250.0}


def recorded_experiment(
    folder, name: str, level, seconds: float, workload: tuple, sampling_end: float, bursts: list
) -> "rx.LoadedExperiment":
    """An experiment folder as a run leaves it: device memory level(t) every 50 ms from t = 1000."""
    exp = folder / f"01_{name}"
    exp.mkdir()
    t0 = 1000.0
    rx.write_jsonl(
        exp / "memory.jsonl",
        [
            {"kind": "device", "t": t0 + i * 0.05, "used_mib": level(i * 0.05)}
            for i in range(int(seconds / 0.05))
        ],
    )
    rx.write_jsonl(
        exp / "requests.jsonl",
        [
            {
                "ok": True,
                "t_send": t0 + 3,
                "e2e_s": 0.9,
                "ttft_s": 0.1,
                "server": "A",
                "phase": "burst 1",
                "repeat": 0,
            }
        ],
    )
    rx.write_json(
        exp / "experiment.json",
        {
            "name": name,
            "question": "q",
            "servers": [],
            "sample_interval_s": 0.05,
            "finished": True,
            "marks": {
                "idle_after_load": [t0, t0 + 1],
                "workload": [t0 + workload[0], t0 + workload[1]],
                "sampling_end": t0 + sampling_end,
                "bursts": [
                    dict(
                        phase=f"burst {k + 1}",
                        server="A",
                        repeat=0,
                        start=t0 + b["start"],
                        end=t0 + b["end"],
                        **{key: v for key, v in b.items() if key not in ("start", "end")},
                    )
                    for k, b in enumerate(bursts)
                ],
            },
        },
    )
    return rx.load_experiment(exp)


def test_the_residual_after_each_burst_is_read_just_before_the_next(tmp_path):

    def level(t):  # two bursts, each leaving some pages behind
        return 1000 + (300 if 3 <= t < 4 or 6 <= t < 7 else 0) + (50 if t >= 4 else 0) + (30 if t >= 7 else 0)

    loaded = recorded_experiment(
        tmp_path, "kvcached", level, 10, (3, 7), 9.95, [{"start": 3, "end": 4}, {"start": 6, "end": 7}]
    )
    assert rx.summarize_experiment(loaded, 0.05).residual_after_burst_mib == [50, 80]


def test_an_open_loop_window_without_arrivals_is_an_empty_step(tmp_path, said):
    cfg = rx.Config(arrivals="poisson", rates="0.001,50", duration_s=1, prompt_tokens=64, max_tokens=16)
    plan = rx.open_loop_plan(cfg, "x")
    assert plan.burst(0) == [] and plan.burst(1)
    server = type("S", (), {"fail_if_dead": lambda self, when: None})()  # alive
    step = rx.Step("burst 1", "A", "main", 0)
    exp = rx.ExperimentSpec("kvcached", "q", (), (step,))
    trial = rx.Trial(cfg, exp, {"main": plan}, {"A": server}, None, None, tmp_path)
    assert rx.run_step(trial, step, 0, lambda r: None) == []
    assert said == ["    burst 1: no request planned in this window"]


def test_a_staggered_models_ramp_names_the_model_and_counts_from_its_first_planned_request(
    tmp_path, said, monkeypatch
):
    # "ramp 1" is every model's step: each model's line names it, and B's ramp, planned to start 8 s
    # into the window, is timed from there (it ends at 111 s, 11 s after the window started at 100 s)
    cfg = rx.Config(prompt_tokens=64, max_tokens=16)
    reqs = [rx.PlannedRequest(0, i, "p", 16, 0.0, offset_s=8.0 + i) for i in range(3)]
    clock = iter([100.0, 111.0])
    monkeypatch.setattr(rx.time, "time", lambda: next(clock))
    done = types.SimpleNamespace(ok=True, ttft_s=0.05, error=None)
    monkeypatch.setattr(rx, "run_burst", lambda server, planned, *a, **k: [done] * len(planned))
    server = type("S", (), {"fail_if_dead": lambda self, when: None})()  # alive
    step = rx.Step("ramp 1", "B", "ramp_B", 0)
    exp = rx.ExperimentSpec("shared_kvcached", "q", (), (step,))
    plan = rx.WorkloadPlan.of(cfg, reqs, 1, max_tokens=16, prompt_tokens=64, sizing="ramp")
    trial = rx.Trial(cfg, exp, {"ramp_B": plan}, {"A": server, "B": server}, None, None, tmp_path)
    assert len(rx.run_step(trial, step, 0, lambda r: None)) == 3
    assert said == ["    B ramp 1: 3 requests in 3.0 s, 0 failed, TTFT p50 0.050 s"]


def test_the_sleep_arms_last_residual_is_read_once_the_server_is_asleep_again(tmp_path):
    """Seen on an H200: sampling ended 0.27 s after the last burst, 0.15 s of which the server took to
    fall asleep (105 GB -> 1.6 GB); read over that fall, the residual came out at 23 GB instead of ~0."""

    def level(t):  # awake during the burst, asleep after
        return 1600 + (80000 if 3 <= t < 4.15 else 0)

    loaded = recorded_experiment(
        tmp_path, "sleep", level, 4.3, (3, 4), 4.27, [{"start": 3, "end": 4, "wake_s": 0.15, "sleep_s": 0.15}]
    )
    assert rx.summarize_experiment(loaded, 0.05).residual_after_burst_mib == [0]


def test_under_the_sleep_router_the_last_residual_is_read_once_every_model_is_asleep(tmp_path):
    """Seen on an H100: the router put three models to sleep after the last window (0.4 s, 30 GB -> 3.5
    GB) and sampling ended just after; read over that fall, the residual came out at 16,302 MiB, not 6."""

    def level(t):  # the models awake in the window and while the router puts them to sleep
        return 3500 + (26000 if 3 <= t < 4.4 else 0)

    bursts = [{"start": 3, "end": 4, "rate": 2.0}]
    loaded = recorded_experiment(tmp_path, "shared_sleep", level, 4.6, (3, 4), 4.55, bursts)
    loaded.record.router = {"A": {"wakes": [0.1], "sleeps": [0.2], "waits": [0.1]}}
    assert rx.summarize_experiment(loaded, 0.05).residual_after_burst_mib == [None], "not marked: n/a"
    loaded.record.marks.asleep = 1000 + 4.45
    assert rx.summarize_experiment(loaded, 0.05).residual_after_burst_mib == [0]


# --- per-model traffic: staggered ramps --------------------------------------------------------------
def test_a_ramp_rises_step_by_step_to_its_peak_and_falls_back_to_one():
    assert rx.ramp_seconds(4, 1) == [1, 2, 3, 4, 3, 2, 1]
    assert rx.ramp_seconds(5, 2) == [2, 4, 5, 3, 1]
    # requests evenly spaced within each second, a fraction carried to the next one
    assert rx.ramp_offsets([2, 1], 10.0) == [10.25, 10.75, 11.5]
    assert rx.ramp_offsets([0.5, 0.5, 0.5], 0.0) == [1.5], "half a request a second: one every two"


def test_the_workload_line_counts_every_model_sent_at_once(monkeypatch):
    cfg = rx.Config(
        models="m1,m2,m3", arrivals="ramp", peak_rates="3,6", ramp_step=3, duration_s=30, max_tokens=8
    )
    plans = {f"ramp_{key}": rx.ramp_plan(cfg, i, "x") for i, key in enumerate("ABC")}
    plans["main"] = plans["ramp_A"]
    said: list[str] = []
    monkeypatch.setattr(rx.STATE, "out", said.append)
    rx.say_workload(cfg, plans, ["ramp_A", "ramp_B", "ramp_C"])
    rx.say_workload(cfg, plans, ["ramp_A"])  # experiments 1, 2 and 6 alone send model A's
    assert plans["main"].burst_size == 13, "3 + 6 + 3 + 1 requests in the peak-6 window"
    assert said[0].startswith("workload: 2 windows x 39 requests (busiest, 3 models together), ~"), said
    assert f"~{plans['ramp_A'].prompt_tokens} prompt" in said[0], "not the tutorial's: each plan's own length"
    assert said[1].startswith("workload: 2 windows x 13 requests (busiest),"), said


def test_each_model_ramps_in_turn_one_window_per_peak():
    cfg = rx.Config(
        models="m1,m2,m3", arrivals="ramp", peak_rates="3,4", ramp_step=1, duration_s=30, max_tokens=8
    )
    plans = [rx.ramp_plan(cfg, position, "x") for position in range(3)]
    for position, plan in enumerate(plans):
        assert plan.rates == (3, 4) and plan.arrivals == "ramp" and plan.bursts == 2
        for window, peak in enumerate((3, 4)):
            offsets = [r.offset_s for r in plan.burst(window)]
            start = position * peak  # the default stagger: once the model before has peaked
            per_second = [sum(start + s <= t < start + s + 1 for t in offsets) for s in range(2 * peak)]
            assert per_second == [*range(1, peak + 1), *range(peak - 1, 0, -1), 0], (position, window)
    assert [r.prompt for r in rx.ramp_plan(cfg, 1, "x").requests] == [r.prompt for r in plans[1].requests]
    assert rx.ramp_length(cfg, 4, 3) == 2 * 4 + 7
    staggered = rx.ramp_plan(dataclasses.replace(cfg, stagger_s=0.5), 2, "x")
    assert staggered.burst(0)[0].offset_s == pytest.approx(1.0 + 0.5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--peak-rates", "4"], "--peak-rates: apply to --arrivals ramp"),
        (["--arrivals", "ramp"], "--peak-rates: must be peak requests per second of 1 to 1e+06"),
        (["--arrivals", "ramp", "--peak-rates", "4,x"], "--peak-rates: must be peak requests per second"),
        (["--arrivals", "ramp", "--peak-rates", "0.5"], "--peak-rates: must be peak requests per second"),
        (
            ["--arrivals", "ramp", "--peak-rates", "4", "--ramp-step", "0"],
            "--ramp-step: must be at least 1e-06",
        ),
        (["--arrivals", "ramp", "--peak-rates", "4", "--stagger-s", "-1"], "--stagger-s: must be >= 0"),
        (
            ["--arrivals", "ramp", "--peak-rates", "20", "--duration-s", "30"],
            "--duration-s: is 30 s, but the ramp of 2 model(s) to 20 requests/s in steps of 1 lasts 59 s",
        ),
        (
            ["--arrivals", "ramp", "--peak-rates", "4", "--rate", "2"],
            "--arrivals: ramp takes --peak-rates; leave out --rate/--rates",
        ),
    ],
)
def test_bad_ramps_are_refused_naming_the_flag(flags, message, capsys):
    assert rx.main(flags, out=lambda _: None) == 2
    assert message in capsys.readouterr().err


def test_a_ramp_is_as_long_as_the_models_the_chosen_experiments_serve():
    # experiment 1 serves model A alone: model B's staggered ramp is not sent, so it cannot be too long
    cfg = rx.Config(arrivals="ramp", peak_rates="20", duration_s=45, experiments="1")
    rx.check_ramp(cfg)
    with pytest.raises(rx.ConfigError, match="the ramp of 2 model"):
        rx.check_ramp(dataclasses.replace(cfg, experiments="1,3"))


def ramp_sweep_args(base):
    ramp = [
        "--arrivals",
        "ramp",
        "--peak-rates",
        "2,3",
        "--ramp-step",
        "3",
        "--stagger-s",
        "0.5",
        *GENEROUS_SLOS,
    ]
    sleep = ["--sleep-after-idle-s", "0.3"]
    return script_args(
        base / "results", "--experiments", "3,4,7", *ramp, *sleep, "--duration-s", "4", "--plots"
    )


@background("ramp_sweep_run", weight=16)
def ramp_sweep_cmd(base):
    (base / "gpu").mkdir()
    return dict(args=ramp_sweep_args(base), env=fake_env(base / "gpu"), timeout=180)


@pytest.fixture
def ramp_sweep_run(background_runs):
    return succeeded_run(background_runs, "ramp_sweep_run")


def test_a_two_model_ramp_sweep_sends_both_models_at_once_and_reports_capacity(ramp_sweep_run):
    run = ramp_sweep_run
    strategies = (
        ("shared_kvcached", "01_shared_kvcached"),
        ("shared_static", "02_shared_static"),
        ("shared_sleep", "03_shared_sleep"),
    )
    for name, folder in strategies:
        record = json.loads((run / folder / "experiment.json").read_text())
        assert [(b["phase"], b["server"], b["rate"]) for b in record["marks"]["bursts"]] == [
            ("ramp 1", "*", 2),
            ("ramp 2", "*", 3),
        ]
        rows = rx.read_jsonl(run / folder / "requests.jsonl")
        for window, mark in enumerate(record["marks"]["bursts"]):
            for slot in "AB":
                plan = json.loads(gzip.decompress((run / f"plan_ramp_{slot}.json.gz").read_bytes()))
                planned = {r["index"]: r["offset_s"] for r in plan["requests"] if r["burst"] == window}
                mine = [r for r in rows if r["burst"] == window and r["server"] == slot]
                assert sorted(r["index"] for r in mine) == sorted(planned), (name, window, slot)
                assert all(mark["start"] <= r["t_send"] - planned[r["index"]] for r in mine)
        summary = json.loads((run / "summary.json").read_text())["experiments"][name]
        assert summary["capacity"]["attainment"] == {"2": 1.0, "3": 1.0}
        assert summary["capacity"]["verdict"] == "above the sweep" and summary["memory_cost"]["gib_hours"] > 0
        assert set(summary["servers"]) == {"A", "B"}
    firsts = [
        json.loads(gzip.decompress((run / f"plan_ramp_{slot}.json.gz").read_bytes()))["requests"][0][
            "offset_s"
        ]
        for slot in "AB"
    ]
    assert firsts[1] - firsts[0] == pytest.approx(0.5), "B's ramp starts --stagger-s after A's"
    md = (run / "summary.md").read_text()
    for name in ("shared_kvcached", "shared_static", "shared_sleep"):
        assert f"| {name} | 100% | 100% | above the sweep" in md and "GiB·h" in md
        assert f"- {name}, per model over all windows: A 100%, B 100%" in md
    # the rate a ramp sweeps is each model's peak, not what the card takes: said so wherever it is named
    assert "| experiment | peak 2 req/s | peak 3 req/s | capacity |" in md
    assert "| shared_kvcached | ramp 2 | peak 3 req/s | " in md, "the latency-by-window table too"
    assert (
        "At 99% attainment, shared_kvcached held 3 requests/s per model at peak (above the sweep), "
        "the card holding" in md
    )
    record = json.loads((run / "01_shared_kvcached" / "experiment.json").read_text())
    assert record["question"] == "Two models on one GPU, both elastic, staggered ramps."
    plots = ("attainment.png", "shared_memory.png", "memory_per_model.png")
    assert all((run / "plots" / p).stat().st_size > 10_000 for p in plots)


def test_report_rebuilds_attainment_capacity_and_the_router_from_the_raw_files(ramp_sweep_run, tmp_path):
    copy = tmp_path / ramp_sweep_run.name
    shutil.copytree(ramp_sweep_run, copy, ignore=shutil.ignore_patterns("*.png", "summary.*"))
    assert rx.main(["--report", str(copy), "--no-plots"], out=lambda _: None) == 0
    rebuilt, committed = (json.loads((d / "summary.json").read_text()) for d in (copy, ramp_sweep_run))
    for name in ("shared_kvcached", "shared_static", "shared_sleep"):
        for key in ("capacity", "rate_sweep", "memory_cost", "sleep"):
            assert rebuilt["experiments"][name].get(key) == committed["experiments"][name].get(key), (
                name,
                key,
            )


def test_the_sleep_router_wakes_each_model_for_its_requests_and_counts_the_wait(ramp_sweep_run):
    run = ramp_sweep_run / "03_shared_sleep"
    record = json.loads((run / "experiment.json").read_text())
    assert (
        "a router wakes a model for its requests, puts it back to sleep after 0.3 s idle"
        in record["question"]
    )
    rows = rx.read_jsonl(run / "requests.jsonl")
    for slot in "AB":
        log = record["router"][slot]
        assert len(log["waits"]) == sum(r["server"] == slot for r in rows), "one wait per request"
        assert len(log["wakes"]) >= 2, "both models send in both windows, and only one fits awake"
        assert len(log["sleeps"]) == len(log["wakes"]), "each wake-up ends in sleep, the last one at the end"
        assert max(log["waits"]) >= min(log["wakes"]), "the first request of a wake-up waits it out"
    summary = json.loads((ramp_sweep_run / "summary.json").read_text())["experiments"]["shared_sleep"]
    assert summary["sleep"]["router"]["A"]["wakes"] == len(record["router"]["A"]["wakes"])
    md = (ramp_sweep_run / "summary.md").read_text()
    assert "Sleep router (a request for a sleeping model wakes it" in md
    assert re.search(r"- shared_sleep, B: woke \d+ times \(0\.\d\d s on average\), slept \d+ times", md)
    assert "the router below woke each model for its requests" in md and "wake-up of n/a" not in md


def test_number_flags_skip_empty_entries_and_refuse_an_empty_list():
    assert rx.number_list(rx.Config(rates="2, 4,"), "rates", lambda r: r > 0, "why") == [2.0, 4.0]
    with pytest.raises(rx.ConfigError, match=r"--rates: why; got ' , '"):
        rx.number_list(rx.Config(rates=" , "), "rates", lambda r: r > 0, "why")


def test_a_windows_rate_adds_the_models_own_rates_and_keeps_a_ramps_peak_or_a_traces_scale():
    def marked(arrivals, *rates):
        burst = rx.BurstMark("w", rx.ALL_SLOTS, 0, 0.0)
        rx.mark_rate(burst, [types.SimpleNamespace(arrivals=arrivals, rates=[r]) for r in rates], 0)
        return burst.rate, burst.rate_unit

    assert marked("poisson", 2.0, 8.0, 4.0) == (14.0, None), "--rates-per-model: the card takes them all"
    assert marked("ramp", 12.0, 12.0, 12.0) == (12.0, rx.RAMP_PEAK), "each model's peak"
    assert marked("trace", 0.5, 0.5) == (0.5, rx.TRACE_SCALE)


def test_goodput_is_not_judged_where_responses_did_not_stream():
    # each answer in one read: its "TTFT" is the whole response, so the SLOs cannot be told
    rows = [dict(ok=True, t_send=0.0, ttft_s=0.4, e2e_s=0.4, completion_tokens=100, content_reads=1)] * 3
    latency = rx.latency_summary(rows, slo=(500, 50))
    assert latency.ttft_note == rx.NOT_STREAMED and latency.goodput is None


def test_an_open_loop_burst_is_busy_from_its_first_token_to_its_last_end_on_the_wall_clock():
    # sent 2 s after its planned arrival at 100: its clocks (TTFT 2.5 s, E2E 4 s) run from the arrival
    late = dict(ok=True, server="A", phase="A burst 1", repeat=0, t_send=100.0, send_delay_s=2.0)
    rows = [rx.RequestRecord(experiment="x", burst=0, index=0, ttft_s=2.5, e2e_s=4.0, **late)]
    bursts = [rx.BurstMark("A burst 1", "A", 0, 100.0, 104.5)]
    assert rx.busy_spans(types.SimpleNamespace(records=rows), "A", bursts) == [(102.5, 104.0)]


def test_a_prompt_length_no_response_reported_is_unknown_not_zero():
    rows = [dict(ok=True, t_send=0.0, ttft_s=0.1, e2e_s=0.2, completion_tokens=8, content_reads=8)] * 2
    assert rx.latency_summary(rows).prompt_tokens_mean is None
    assert rx.latency_summary([dict(rows[0], prompt_tokens=30), rows[1]]).prompt_tokens_mean == 30


def test_a_lognormal_mix_cut_at_max_tokens_says_how_far_its_mean_moved():
    cfg = rx.Config(output_tokens_dist="lognormal:128,0.6", max_tokens=128, prompt_tokens=64)
    plan = rx.plan_workload(cfg, 500, "x", bursts=1)
    note = rx.capped_mix_note(cfg, plan)
    lengths = [r.max_tokens for r in plan.requests]
    assert 0.3 < sum(n == 128 for n in lengths) / 500 < 0.5 and 90 < sum(lengths) / 500 < 105
    assert note.startswith(
        f"  output lengths: {sum(n == 128 for n in lengths)} of 500 requests cut to --max-tokens 128"
    )
    roomy = dataclasses.replace(cfg, output_tokens_dist="lognormal:16,0.1")
    assert rx.capped_mix_note(roomy, rx.plan_workload(roomy, 50, "x", bursts=1)) is None


def test_a_stop_during_every_models_window_keeps_no_row_of_what_it_cut_off(tmp_path, monkeypatch):
    # each model's thread goes on sending until told: rows of requests the servers' stop cuts off are
    # not the servers' failures, and were counted against goodput and capacity
    sink, written = rx.RecordSink(tmp_path / "requests.jsonl"), threading.Event()

    def sending(trial, step, repeat, sink, gate):
        for index in range(300):  # about 3 s, unless halted
            if trial.halt.is_set():
                return []
            sink(rx.RequestRecord("shared_kvcached", step.server, "ramp 1", 0, 0, index, 0.0))
            written.set()
            time.sleep(0.01)
        return []

    def stopped(futures):
        written.wait(5)
        raise KeyboardInterrupt  # Ctrl-C while the main thread waits for the models

    monkeypatch.setattr(rx, "run_step", sending)
    monkeypatch.setattr(rx.concurrent.futures, "as_completed", stopped)
    steps = [rx.Step("ramp 1", slot, f"ramp_{slot}", 0) for slot in "AB"]
    exp = rx.ExperimentSpec("shared_kvcached", "q", (), tuple(steps))
    trial = rx.Trial(rx.Config(), exp, {}, {}, None, None, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        rx.run_concurrent_window(trial, steps, rx.BurstMark("ramp 1", "", 0, 0.0), sink)
    kept = (tmp_path / "requests.jsonl").read_text().count("\n")
    time.sleep(0.2)  # what the threads would have written next
    assert trial.halt.is_set() and kept > 0
    assert (tmp_path / "requests.jsonl").read_text().count("\n") == kept

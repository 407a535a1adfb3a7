"""Trace replay: a production trace's arrivals and lengths, one file per model, as a saved plan."""

import dataclasses
import datetime
import gzip
import json

import pytest
from conftest import background, fake_env, in_process_args, rx, script_args, succeeded_run

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,480,10
2023-11-16 18:17:04.0319600,318,8
2023-11-16 18:17:04.0781490,110,27
2023-11-16 18:17:05.2792720,1145,7
2023-11-16 18:17:06.4249540,7433,14
2023-11-16 18:17:09.5191470,374,14
"""


def test_azure_timestamps_of_2023_and_2024_read_as_utc_seconds():
    assert rx.azure_seconds("2023-11-16 18:17:03.9799600") == pytest.approx(1700158623.97996)
    assert rx.azure_seconds("2024-05-10 00:00:00.009930+00:00") == pytest.approx(1715299200.00993)
    assert rx.azure_seconds("2024-05-10 00:00:01+00:00") == 1715299201.0
    assert rx.azure_seconds("2024-05-10 02:00:01+02:00") == 1715299201.0
    with pytest.raises(ValueError, match="YYYY-MM-DD HH:MM:SS"):
        rx.azure_seconds("10/05/2024 00:00")
    assert rx.azure_seconds(" 12.5") == 12.5
    for endless in ("nan", "inf", "1e400"):  # such a row would fall out of every window, never counted
        with pytest.raises(ValueError, match="neither seconds"):
            rx.azure_seconds(endless)
    with pytest.raises(ValueError, match="line 2: .*not a finite number"):
        rx.mooncake_rows(
            '{"timestamp": 0, "input_length": 5, "output_length": 3}\n'
            '{"timestamp": NaN, "input_length": 5, "output_length": 3}'
        )


def test_a_trace_saved_by_a_spreadsheet_or_gzipped_reads_and_an_absurd_one_is_refused(tmp_path):
    plain = rx.read_trace.__wrapped__  # uncached: each file once
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + AZURE.encode())  # Excel's UTF-8 CSV
    (tmp_path / "trace.csv.gz").write_bytes(gzip.compress(AZURE.encode()))
    expected = [(r.prompt_tokens, r.output_tokens) for r in plain(str(tmp_path / "bom.csv"))]
    assert len(expected) == 6
    assert [(r.prompt_tokens, r.output_tokens) for r in plain(str(tmp_path / "trace.csv.gz"))] == expected
    for name, text in {
        "huge.jsonl": '{"timestamp": 0, "input_length": 1e400, "output_length": 10}\n',
        "long.jsonl": '{"timestamp": 0, "input_length": 100000000000000000000, "output_length": 10}\n',
        "far.csv": "TIMESTAMP,ContextTokens,GeneratedTokens\n0,5,10\n1e300,5,10\n",
        "wide.csv": "TIMESTAMP,ContextTokens,GeneratedTokens\n0,5," + "9" * 200_000 + "\n",
    }.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(rx.ConfigError, match="--trace: .* is not"):
            plain(str(tmp_path / name))
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(AZURE.encode())[:30])
    damaged = bytearray(gzip.compress(AZURE.encode()))
    damaged[12:20] = b"\xff" * 8  # a deflate stream that does not decode: zlib.error, not an OSError
    (tmp_path / "damaged.csv.gz").write_bytes(damaged)
    for name in ("cut.csv.gz", "damaged.csv.gz"):
        with pytest.raises(rx.ConfigError, match="--trace: cannot read"):
            plain(str(tmp_path / name))


def test_each_call_of_main_reads_the_trace_and_the_hub_afresh(tmp_path, monkeypatch):
    # in a notebook, a trace edited between two calls was replayed as it was, and a hub file that failed
    # before a token was set went on failing
    (tmp_path / "t.csv").write_text(AZURE)
    assert len(rx.read_trace(str(tmp_path / "t.csv"))) == 6
    (tmp_path / "t.csv").write_text("\n".join(AZURE.splitlines()[:3]) + "\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rx.hub_file("org/gated-model", "config.json")  # failed: no token yet, or offline
    assert rx.hub_file.cache_info().currsize == 1
    rx.main(["--bad-flag"], out=lambda _: None)
    assert len(rx.read_trace(str(tmp_path / "t.csv"))) == 2
    assert rx.hub_file.cache_info().currsize == 0


def mooncake(rows: int = 8) -> str:
    lines = [
        {
            "timestamp": 5000 + 450 * i,
            "input_length": 300 + 100 * i,
            "output_length": 4 + i,
            "hash_ids": [7, 20 + i],
        }
        for i in range(rows)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines)


def azure_times(text: str) -> list[float]:
    stamps = [line.split(",")[0] for line in text.splitlines()[1:]]
    moments = [datetime.datetime.fromisoformat(s[:26]) for s in stamps]
    return [(m - moments[0]).total_seconds() for m in moments]


@pytest.fixture
def traces(tmp_path):
    (tmp_path / "azure.csv").write_text(AZURE)
    (tmp_path / "mooncake.jsonl").write_text(mooncake())
    return tmp_path


def trace_cfg(traces, **flags) -> "rx.Config":
    files = f"{traces / 'azure.csv'},{traces / 'mooncake.jsonl'}"
    return rx.Config(models="m1,m2,m3", arrivals="trace", trace=files, max_model_len=4096, **flags)


def test_a_card_of_a_gpus_run_with_only_the_overload_experiments_resolves_them_from_the_saved_plans(tmp_path):
    """The main plan went unsaved when no chosen experiment sent it, and each card's process, resolving
    its experiments' schedules with it, failed every one with KeyError: 'main'."""
    cfg = rx.Config(prompt_tokens=64, max_tokens=16, overload_budget_gib=1.0)
    plans = {"main": rx.plan_workload(cfg, 4, "x"), "overload_A": rx.plan_workload(cfg, 2, "y")}
    overload = [e for e in rx.EXPERIMENTS if e.group == "overload"]
    rx.save_plans(tmp_path, plans, overload)
    saved = rx.load_plans(tmp_path)
    spec = rx.resolve_experiment(overload[0], cfg, saved, rx.GIB)
    assert [s.plan for s in spec.steps] == ["overload_A", "overload_B"]


def test_a_saved_trace_plan_replays_each_file_to_the_millisecond_and_its_lengths_exactly(traces, tmp_path):
    cfg = trace_cfg(traces, trace_window="0.05:4.5", trace_speedup=2.0)
    plans = {f"trace_{key}": rx.trace_plan(cfg, i, "x") for i, key in enumerate("ABC")}
    rx.save_plans(tmp_path, plans, [])
    saved = rx.load_plans(tmp_path)
    azure_at = azure_times(AZURE)
    chosen = [i for i, t in enumerate(azure_at) if 0.05 <= t < 4.5]
    a = saved["trace_A"].requests
    assert [r.trace_row for r in a] == chosen == [1, 2, 3, 4]
    assert [round(r.offset_s, 3) for r in a] == [round((azure_at[i] - 0.05) / 2, 3) for i in chosen]
    lines = AZURE.splitlines()[1:]
    assert [(r.prompt_tokens, r.max_tokens) for r in a] == [
        tuple(int(v) for v in lines[i].split(",")[1:]) for i in chosen[:3]
    ] + [(4096 - rx.PROMPT_MARGIN_TOKENS - 14, 14)], "the 7,433-token prompt clipped to fit"
    assert [r.clipped for r in a] == [False, False, False, True]
    b = saved["trace_B"].requests  # the JSONL: milliseconds, from its first request
    assert [r.offset_s for r in b] == [pytest.approx((0.45 * i - 0.05) / 2, abs=1e-6) for i in range(1, 8)]
    assert [(r.prompt_tokens, r.max_tokens) for r in b] == [
        (300 + 100 * r.trace_row, 4 + r.trace_row) for r in b
    ]
    assert [r.offset_s for r in saved["trace_C"].requests] == [r.offset_s for r in a], (
        "files cycle over models"
    )
    assert rx.plan_summary(saved["trace_A"])["clipped"] == 1
    assert rx.trace_plan(cfg, 0, "x") == plans["trace_A"], "the same seed plans the same requests"


def test_requests_sharing_hash_ids_share_their_prompt_blocks(traces):
    plan = rx.trace_plan(trace_cfg(traces), 1, "x")
    first, second = (r.prompt.split() for r in plan.requests[3:5])  # 600 and 700 tokens long
    assert first[:512] == second[:512], "block 7 is the first of both"
    assert first[512:560] != second[512:560], "their second blocks differ"
    assert all(
        abs(len(r.prompt.split()) + rx.CHAT_TEMPLATE_TOKENS - r.prompt_tokens) <= 1 for r in plan.requests
    )


def test_a_rate_scale_repeats_or_thins_the_trace_one_window_each(traces):
    cfg = trace_cfg(traces, trace_rate_scale="0.5,1,2")
    plan = rx.trace_plan(cfg, 1, "x")
    rows = [[r.trace_row for r in plan.burst(w)] for w in range(3)]
    assert plan.rates == (0.5, 1, 2) and plan.bursts == 3
    assert rows[1] == list(range(8)) and rows[2] == sorted(2 * list(range(8)))
    assert set(rows[0]) < set(rows[1]) and len(rows[0]) < 8, "a seeded half, a subset of the whole"
    again = rx.trace_plan(dataclasses.replace(cfg, trace_rate_scale="0.5"), 1, "x")
    assert [r.trace_row for r in again.requests] == rows[0]


def test_a_request_that_fits_is_never_clipped_and_auto_reads_only_the_files_some_model_replays(tmp_path):
    """A 10 + 1,000-token request was planned as 10 + 946 and counted clipped at the very --max-model-len
    auto had sized for it; and a third file, which no model of two replays, sized that length."""
    (tmp_path / "long_answers.csv").write_text(AZURE.replace(",480,10", ",10,1000"))
    (tmp_path / "unused.csv").write_text(AZURE.replace(",480,10", ",20000,500"))
    files = f"{tmp_path / 'long_answers.csv'},{tmp_path / 'long_answers.csv'},{tmp_path / 'unused.csv'}"
    cfg = rx.config_from_args(["--arrivals", "trace", "--trace", files, "--max-model-len", "auto"])
    assert cfg.max_model_len == 7433 + 14 + rx.PROMPT_MARGIN_TOKENS, "the longest of the files replayed"
    tight = dataclasses.replace(cfg, max_model_len=10 + 1000 + rx.PROMPT_MARGIN_TOKENS)
    first = rx.trace_plan(tight, 0, "x").requests[0]
    assert (first.prompt_tokens, first.max_tokens, first.clipped) == (10, 1000, False)
    shorter = rx.trace_plan(dataclasses.replace(tight, max_model_len=tight.max_model_len - 1), 0, "x")
    assert (shorter.requests[0].prompt_tokens, shorter.requests[0].max_tokens) == (10, 999)


def test_max_model_len_auto_takes_the_longest_request_within_the_models_own_limit(traces, tmp_path, capsys):
    flags = ["--arrivals", "trace", "--trace", str(traces / "azure.csv"), "--max-model-len", "auto"]
    assert rx.config_from_args(flags).max_model_len == 7433 + 14 + rx.PROMPT_MARGIN_TOKENS
    small = tmp_path / "small-model"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    cfg = rx.config_from_args([*flags, "--model-a", str(small), "--trace-window", "0:5"])
    assert (
        cfg.max_model_len == 4096
        and "the models' own limit 4096: longer requests are clipped" in capsys.readouterr().out
    )
    assert [r.clipped for r in rx.trace_plan(cfg, 0, "x").requests] == [False] * 4 + [True]
    assert rx.main(["--max-model-len", "auto"], out=lambda _: None) == 2
    assert "--max-model-len: auto needs --arrivals trace" in capsys.readouterr().err
    # a trace of short requests: 134 tokens, below twice the preset's --max-tokens, which no trace reads
    short = tmp_path / "short.csv"
    short.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,50,20\n1,40,30\n2,60,10\n")
    short_flags = ["--arrivals", "trace", "--trace", str(short), "--max-model-len", "auto"]
    cfg = rx.config_from_args([*short_flags, "--experiments", "1,2,3,4"])
    assert cfg.max_model_len == 60 + 10 + rx.PROMPT_MARGIN_TOKENS
    with pytest.raises(rx.ConfigError, match="--max-tokens"):  # all: the overload plans do read it
        rx.config_from_args(short_flags)


def test_the_busiest_stretch_is_the_one_with_the_most_requests(traces):
    rows = rx.read_trace(str(traces / "azure.csv"))
    assert rx.trace_window(rows, "busiest:1") == (0.0, 1.0)
    assert rx.trace_window(rows, "2:") == (2.0, float("inf"))
    assert rx.trace_window(rows, "") == (0.0, float("inf"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trace", "{azure}"], "--trace: applies to --arrivals trace"),
        ([], "--trace: --arrivals trace needs --trace FILE"),
        (["--trace", "{missing}"], "--trace: cannot read"),
        (
            ["--trace", "{other}"],
            "is not an Azure LLM inference CSV with the columns TIMESTAMP,ContextTokens,Gen",
        ),
        (["--trace", "{broken}"], "line 2: "),
        (["--trace", "{azure}", "--trace-window", "100:200"], "--trace-window: 100:200 selects no request"),
        (["--trace", "{azure}", "--trace-window", "5:2"], "--trace-window: '5:2' is not START:END"),
        (["--trace", "{azure}", "--trace-speedup", "0"], "--trace-speedup: must be 1e-06 to 1e+06"),
        (["--trace", "{azure}", "--trace-rate-scale", "1,-2"], "--trace-rate-scale: must be positive"),
        # 20,000 x its 6 requests would be planned, a prompt each, before anything else is checked
        (
            ["--trace", "{azure}", "--trace-rate-scale", "1,20000"],
            "--trace-rate-scale: 20000 x the 6 requests",
        ),
        # 5.5 s of trace, a million times slower: 64 days of replay, which overflowed a wait once started
        (["--trace", "{azure}", "--trace-speedup", "1e-6"], "s window replays over 5,539,"),
        (["--trace", "{azure}", "--rate", "2"], "--arrivals: trace: leave out --rate(s)/--peak-rates"),
        # the mix was accepted and then ignored: a trace's output lengths come from the trace
        (
            ["--trace", "{azure}", "--output-tokens-dist", "uniform:1-9"],
            "--output-tokens-dist: a trace's lengths",
        ),
        (
            ["--trace", "{azure}", "--shared-prefix-tokens", "64"],  # not "add --prefix-caching" first
            "--shared-prefix-tokens: a trace's prompts take none: leave it out",
        ),
    ],
)
def test_bad_traces_are_refused_naming_the_flag(flags, message, traces, capsys):
    (traces / "other.csv").write_text("time,prompt,output\n1,2,3\n")
    (traces / "broken.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    names = {
        n: str(traces / f)
        for n, f in (("azure", "azure.csv"), ("other", "other.csv"), ("broken", "broken.csv"))
    }
    flags = [f.format(missing=traces / "nope.csv", **names) for f in flags]
    arrivals = [] if flags[:1] == ["--trace"] and "applies" in message else ["--arrivals", "trace"]
    assert rx.main([*arrivals, *flags], out=lambda _: None) == 2
    assert message in capsys.readouterr().err


def trace_run_args(base):
    (base / "azure.csv").write_text(AZURE)
    (base / "mooncake.jsonl").write_text(mooncake(12))
    trace = [
        "--arrivals",
        "trace",
        "--trace",
        f"{base / 'azure.csv'},{base / 'mooncake.jsonl'}",
        "--trace-window",
        ":3",
        "--trace-speedup",
        "2",
        "--trace-rate-scale",
        "1,2",
        "--slo-ttft-ms",
        "5000",
        "--slo-tpot-ms",
        "1000",
    ]
    return script_args(base / "results", "--experiments", "3", *trace)


@background("trace_run", weight=7)
def trace_run_cmd(base):
    (base / "gpu").mkdir()
    return dict(args=trace_run_args(base), env=fake_env(base / "gpu"), timeout=180)


@pytest.fixture
def trace_run(background_runs):
    return succeeded_run(background_runs, "trace_run")


def test_a_two_model_trace_replay_sends_each_file_to_its_model_and_reports_capacity_per_scale(trace_run):
    run = trace_run
    record = json.loads((run / "01_shared_kvcached" / "experiment.json").read_text())
    assert record["question"] == "Two models on one GPU, both elastic, replayed traces."
    marks = record["marks"]["bursts"]
    assert [(b["phase"], b["server"], b["rate"], b["rate_unit"]) for b in marks] == [
        ("trace 1", "*", 1, "x trace"),
        ("trace 2", "*", 2, "x trace"),
    ]
    rows = rx.read_jsonl(run / "01_shared_kvcached" / "requests.jsonl")
    for slot in "AB":
        plan = json.loads(gzip.decompress((run / f"plan_trace_{slot}.json.gz").read_bytes()))
        for window in (0, 1):
            planned = {r["index"]: r for r in plan["requests"] if r["burst"] == window}
            mine = [r for r in rows if r["burst"] == window and r["server"] == slot]
            assert sorted(r["index"] for r in mine) == sorted(planned), (slot, window)
            assert all(r["planned_prompt_tokens"] == planned[r["index"]]["prompt_tokens"] for r in mine)
            assert all(r["completion_tokens"] == planned[r["index"]]["max_tokens"] for r in mine), (
                "ignore_eos"
            )
    summary = json.loads((run / "summary.json").read_text())["experiments"]["shared_kvcached"]
    assert (
        summary["capacity"]["attainment"] == {"2": 1.0, "4": 1.0} and summary["capacity"]["unit"] == "x trace"
    )
    assert summary["prompt_tokens"]["requests"] == len(rows) and summary["prompt_tokens"]["planned"] > 0
    md = (run / "summary.md").read_text()
    # the windows are marked with their rate scale, 1 and 2; replayed twice as fast, they arrived at 2 and
    # 4 times the trace's own rate, which the report shows
    assert "| experiment | 2x the trace | 4x the trace | capacity |" in md
    assert "held 4x the trace (above the sweep)" in md
    assert "Prompt tokens vLLM counted against the trace's: shared_kvcached " in md


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--trace", "{azure}", "--trace-rate-scale", "0.0001"],
            "--trace-rate-scale: the workload plan holds",
        ),
        (
            ["--arrivals", "poisson", "--rate", "0.001", "--duration-s", "2"],
            "--rate: the workload plan holds",
        ),
        (
            ["--arrivals", "poisson", "--rates-per-model", "5,0.0001", "--duration-s", "2"],
            "--rates-per-model: model B's plan holds no request in any window",
        ),
    ],
)
def test_a_workload_that_plans_no_request_is_refused_naming_the_flag(
    flags, message, traces, fake_gpu, tmp_path, capsys
):
    # it ran every server, sent nothing and ended with exit 0
    flags = [flag.format(azure=traces / "azure.csv") for flag in flags]
    arrivals = ["--arrivals", "trace"] if "--trace" in flags else []
    args = in_process_args(tmp_path / "r", "--check", *arrivals, *flags)
    assert rx.main(args, nvml_module=fake_gpu) == 2
    assert message in capsys.readouterr().err

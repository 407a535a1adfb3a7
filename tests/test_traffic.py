"""Traffic closer to real use: decode-length mixes, per-token latency, goodput under SLOs, a CSV."""
import csv
import json
import sys

import pytest

from conftest import FAKE_SERVER, FAST, free_port, rx


def test_output_lengths_follow_the_distribution_and_keep_the_prompts():
    fixed = rx.plan_workload(rx.Config(max_tokens=64), 200, "x", bursts=1, prompt_tokens=100)
    mixed = rx.plan_workload(rx.Config(max_tokens=64, output_tokens_dist="uniform:16-128"), 200, "x",
                             bursts=1, prompt_tokens=100)
    lengths = [r.max_tokens for r in mixed.requests]
    assert {r.max_tokens for r in fixed.requests} == {64}
    assert min(lengths) >= 16 and max(lengths) <= 128 and len(set(lengths)) > 50
    assert [r.prompt for r in fixed.requests] == [r.prompt for r in mixed.requests], "same seed, same prompts"
    assert lengths == [r.max_tokens for r in rx.plan_workload(
        rx.Config(max_tokens=64, output_tokens_dist="uniform:16-128"), 200, "x", bursts=1, prompt_tokens=100).requests]
    lognormal = rx.plan_workload(rx.Config(max_tokens=512, output_tokens_dist="lognormal:64,0.5"), 2000, "x",
                                 bursts=1, prompt_tokens=100)
    mean = sum(r.max_tokens for r in lognormal.requests) / 2000
    assert 58 < mean < 70


@pytest.mark.parametrize("flags, message", [
    (dict(output_tokens_dist="uniform:0-5"), "--output-tokens-dist"),
    (dict(output_tokens_dist="lognormal:64"), "--output-tokens-dist"),
    (dict(output_tokens_dist="poisson:3"), "--output-tokens-dist"),
    (dict(output_tokens_dist="uniform:16-4000"), "no room for the prompt"),
    (dict(slo_ttft_ms=-1.0), "--slo-ttft-ms"),
])
def test_bad_traffic_flags_are_refused_naming_the_flag(flags, message):
    with pytest.raises(rx.ConfigError, match=message):
        rx.validate_config(rx.Config(**flags))


def test_a_length_mix_turns_on_ignore_eos_so_the_lengths_are_exact():
    cfg = rx.resolve_config(rx.Config(output_tokens_dist="uniform:4-32"), say=lambda _: None)
    assert cfg.ignore_eos


def test_goodput_counts_failures_and_each_objective():
    rows = [{"ok": True, "ttft_s": 0.1, "tpot_s": 0.01}, {"ok": True, "ttft_s": 0.3, "tpot_s": 0.01},
            {"ok": True, "ttft_s": 0.1, "tpot_s": 0.05}, {"ok": False, "ttft_s": 0.1, "tpot_s": 0.01}]
    assert rx.goodput(rows, 200, 0).met == 2
    both = rx.goodput(rows, 200, 20)
    assert (both.met, both.of, both.share) == (1, 4, 0.25)
    assert rx.goodput(rows, 0, 0) is None


def test_token_gaps_are_pooled_over_requests():
    rows = [{"ok": True, "t_send": 0.0, "e2e_s": 1.0, "ttft_s": 0.1, "completion_tokens": 3, "itl_s": [0.01, 0.03]},
            {"ok": True, "t_send": 0.0, "e2e_s": 1.0, "ttft_s": 0.1, "completion_tokens": 2, "itl_s": [0.02]},
            {"ok": False, "t_send": 0.0, "e2e_s": 1.0, "itl_s": [9.0]}]
    summary = rx.latency_summary(rows)
    assert summary.itl_s.n == 3 and summary.itl_s.p50 == pytest.approx(0.02) and summary.itl_s.max == 0.03


def test_a_length_mix_with_slos_end_to_end(fake_gpu, tmp_path):
    said = []
    rc = rx.main([*FAST, "--experiments", "1", "--results-dir", str(tmp_path / "results"), "--server-cmd",
                  f"{sys.executable} {FAKE_SERVER}", "--port-a", str(free_port()), "--port-b", str(free_port()),
                  "--output-tokens-dist", "uniform:4-40", "--slo-ttft-ms", "10000", "--slo-tpot-ms", "0.001"],
                 nvml_module=fake_gpu, say=said.append)
    assert rc == 0, "\n".join(said[-30:])
    run, = (tmp_path / "results").iterdir()
    exp = run / "01_kvcached"
    rows = rx.read_jsonl(exp / "requests.jsonl")
    plan = json.loads(__import__("gzip").decompress((run / "plan_main.json.gz").read_bytes()))
    planned = {(r["burst"], r["index"]): r["max_tokens"] for r in plan["requests"]}
    assert all(r["ok"] and r["completion_tokens"] == planned[(r["burst"], r["index"])] for r in rows)
    assert len({r["completion_tokens"] for r in rows}) > 3, "the responses end at different times"
    summary = json.loads((run / "summary.json").read_text())["experiments"]["kvcached"]
    good = summary["latency"]["goodput"]
    assert good["of"] == len(rows) and good["met"] == 0, "no request meets a 1 microsecond TPOT"
    assert summary["latency"]["itl_s"]["n"] > len(rows)
    md = (run / "summary.md").read_text()
    assert "goodput = requests completed with TTFT <= 10000 ms and TPOT <= 0.001 ms" in md
    assert f"| kvcached | " in md and f"0.0% (0/{len(rows)}) |" in md
    with open(exp / "requests.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["completion_tokens"] and "itl_p50_s" in table[0]

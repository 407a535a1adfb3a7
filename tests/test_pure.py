"""Pure functions: configuration, planning, metrics, results layout. No processes, no network."""

import dataclasses
import json
import linecache
import sys
import types

import pytest
from conftest import ROOT, rx


def names(spec):
    return [e.name for e in rx.parse_experiments(spec)]


def test_experiment_aliases_expand_in_run_order():
    assert names("3,1") == ["kvcached", "shared_kvcached"]
    assert names("seed") == ["kvcached", "shared_kvcached", "static"]
    assert names("5") == ["overload_kvcached", "overload_static"]
    assert names("static,kvcached") == ["kvcached", "static"]
    # grouped by arm, so that a server started for one experiment is reused by the next
    assert names("all") == [
        "kvcached",
        "shared_kvcached",
        "overload_kvcached",
        "static",
        "shared_static",
        "overload_static",
        "sleep",
        "shared_sleep",
    ]


def test_every_group_has_one_experiment_per_compared_arm():
    for group in rx.GROUPS:
        arms = [e.arm for e in rx.EXPERIMENTS if e.group == group]
        assert sorted(a for a in arms if a in rx.COMPARED_ARMS) == sorted(rx.COMPARED_ARMS), group
        assert len(arms) == len(set(arms)) and set(arms) <= set(rx.COMPARED_ARMS + rx.OTHER_ARMS), group
    assert len({e.name for e in rx.EXPERIMENTS}) == len(rx.EXPERIMENTS)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--experiments", "17"], "--experiments"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
        (["--gpu-memory-utilization", "1.2"], "--gpu-memory-utilization"),
        (["--bursts", "-1"], "--bursts"),
        (["--burst-size", "-3"], "--burst-size"),
        (["--repeats", "0"], "--repeats"),
        (["--preset", "huge"], "--preset"),
        (["--overload-demand", "2.5"], "--overload-demand"),
        (["--port-b", "8001"], "--port-b"),
        (["--kvcached-env", "NOEQUALS"], "--kvcached-env"),
        (["--max-tokens", "4096"], "--max-tokens"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_fail_before_launch_naming_the_flag(argv, flag, capsys):
    assert rx.main(argv) == 2
    assert flag in capsys.readouterr().err


def test_a_malformed_max_model_len_says_what_it_takes(capsys):
    assert rx.main(["--max-model-len", "x"]) == 2
    assert "argument --max-model-len: a whole number of tokens or 'auto', not 'x'" in capsys.readouterr().err
    assert rx.build_parser().parse_args(["--max-model-len", "auto"]).max_model_len == rx.AUTO_LENGTH


def test_help_describes_every_flag(capsys):
    assert rx.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fraction of the card vLLM may take" in out and "--overload-budget-gib" in out
    # read from Config's trailing comments: a field the formatter wraps onto more lines loses its text
    helps = rx.config_help()
    assert [f.name for f in rx.dataclasses.fields(rx.Config) if not helps.get(f.name)] == []


def test_presets_fill_the_workload_and_explicit_flags_win():
    seed = rx.config_from_args(["--preset", "seed"])
    assert (seed.bursts, seed.burst_size, seed.gap_s, seed.max_tokens, seed.prompt_tokens) == (
        3,
        6,
        6.0,
        180,
        0,
    )
    assert seed.temperature == 0.7
    mine = rx.config_from_args(["--preset", "seed", "--bursts", "5", "--gap-s", "0"])
    assert (mine.bursts, mine.gap_s) == (5, 0.0)


def test_a_function_from_a_notebook_cell_is_shipped_from_the_source_ipython_keeps():
    source = "def hello():\n    print('hello from a cell')\n"
    name = "<ipython-input-7-test>"
    space: dict = {}
    exec(compile(source, name, "exec"), space)
    with pytest.raises(OSError):
        rx.program_source(space["hello"], call="hello()")
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # what IPython does
    try:
        assert "print('hello from a cell')" in rx.program_source(space["hello"], call="hello()")
    finally:
        linecache.cache.pop(name, None)


def test_the_preflight_says_when_the_keeper_cannot_be_shipped(monkeypatch):
    assert rx.check_keeper().ok

    def unreadable():
        raise OSError("could not get source code")

    monkeypatch.setattr(rx, "keeper_source", unreadable)
    check = rx.check_keeper()
    assert not check.ok and "could not get source code" in check.detail and "IPython" in check.fix


def test_notebook_mode_ignores_kernel_argv(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/kernel-1.json"])
    monkeypatch.setattr(rx, "NOTEBOOK_ARGS", "--preset smoke --tag colab")
    cfg = rx.config_from_args(None)
    assert (cfg.preset, cfg.tag) == ("smoke", "colab")


def test_script_mode_reads_sys_argv(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "argv", ["run_experiments.py", "--tag", "cli"])
    assert rx.config_from_args(None).tag == "cli"


def test_kv_bytes_per_token_of_the_default_models():
    assert rx.kv_bytes_per_token(rx.KNOWN_MODEL_CONFIGS["Qwen/Qwen2.5-0.5B-Instruct"]) == 2 * 24 * 2 * 64 * 2
    assert rx.kv_bytes_per_token(rx.KNOWN_MODEL_CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"]) == 2 * 28 * 2 * 128 * 2


def test_local_model_folder_config_is_read_without_network(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                hidden_size=64,
                torch_dtype="float32",
            )
        )
    )
    config, source = rx.load_model_config(str(tmp_path))
    assert source.endswith("config.json")
    assert rx.kv_bytes_per_token(config) == 2 * 2 * 1 * 16 * 2, "vLLM serves a float32 checkpoint at 16 bits"


# Published config.json sizes (bfloat16 or float16) and each model's parameters
GEMMA_7B = dict(  # no tie_word_embeddings key: transformers leaves out its default, tied
    model_type="gemma",
    hidden_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=256,
    vocab_size=256000,
    intermediate_size=24576,
)
PHI_2 = dict(  # an MLP of two matrices
    model_type="phi",
    hidden_size=2560,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=51200,
    intermediate_size=10240,
    tie_word_embeddings=False,
)


# Phi-2's own config.json says "num_key_value_heads": null (transformers' default: one per head)
@pytest.mark.parametrize(
    "config, billions", [(GEMMA_7B, 8.54), (PHI_2, 2.78), ({**PHI_2, "num_key_value_heads": None}, 2.78)]
)
def test_weights_follow_the_architectures_embeddings_and_mlp(config, billions):
    assert rx.weight_bytes(config) / 2 == pytest.approx(billions * 1e9, rel=0.01)
    assert rx.weight_bytes({**config, "intermediate_size": None}) is None, "a width it cannot read"


def test_latent_attention_keeps_one_compressed_entry_per_layer_and_token():
    deepseek_v2_lite = dict(
        hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64
    )
    assert rx.kv_bytes_per_token(deepseek_v2_lite) == 27 * (512 + 64) * 2


def test_falcons_kv_heads_are_read_and_a_config_without_the_usual_names_has_no_kv_size():
    falcon_7b = dict(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, multi_query=True)
    assert rx.kv_bytes_per_token(falcon_7b) == 2 * 32 * 1 * 64 * 2, "one KV head, not 71"
    falcon_40b = dict(hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8)
    assert rx.kv_bytes_per_token(falcon_40b) == 2 * 60 * 8 * 64 * 2
    gpt2 = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    assert rx.kv_bytes_per_token(gpt2) is None and rx.weight_bytes(gpt2) is None


def test_a_short_max_model_len_plans_no_overload_burst_where_no_overload_experiment_runs():
    cfg = rx.resolve_config(rx.validate_config(rx.Config(preset="smoke", max_model_len=320, experiments="1")))
    plans, _, _ = rx.make_plans(cfg, {"free_mib_at_start": 8000})
    assert "main" in plans and not [key for key in plans if key.startswith("overload")]
    assert rx.overload_lengths(cfg, 416)[1] == rx.OVERLOAD_LEAST_PROMPT


def test_the_overload_burst_keeps_its_sized_lengths_under_an_output_length_mix():
    cfg = rx.Config(
        experiments="5", max_model_len=8192, max_tokens=1024, output_tokens_dist="lognormal:100,1"
    )
    plan = rx.overload_plan(rx.resolve_config(rx.validate_config(cfg)), 12288, 4 * rx.GIB, "A")
    assert {r.max_tokens for r in plan.requests} == {2048} and plan.sizing.startswith(
        "32 requests x (5824 + 2048)"
    )


def test_burst_is_sized_to_a_fraction_of_free_memory():
    size, why = rx.size_burst(12288, 16 * rx.GIB, 768, 128, 0.05, 256)
    per_request = (768 + 128) * 12288
    assert size == int(0.05 * 16 * rx.GIB / per_request)
    assert "5%" in why and str(size) in why
    capped, why = rx.size_burst(12288, 141 * rx.GIB, 768, 128, 0.05, 256)
    assert capped == 256 and "capped" in why
    fallback, why = rx.size_burst(None, None, 768, 128, 0.05, 256)
    assert fallback > 0 and "--burst-size" in why


def test_plan_is_seeded_and_fits_the_context():
    cfg = rx.config_from_args(["--preset", "auto", "--max-model-len", "1024", "--max-tokens", "200"])
    one, two = rx.plan_workload(cfg, 4, "x"), rx.plan_workload(cfg, 4, "x")
    assert one == two
    other = rx.plan_workload(dataclasses.replace(cfg, seed=1), 4, "x")
    assert other.requests != one.requests
    assert len(one.requests) == cfg.bursts * 4 and len(one.burst(0)) == 4
    longest = max(len(r.prompt.split()) for r in one.requests)
    assert longest + 200 <= 1024


def test_seed_preset_uses_the_tutorial_prompts():
    cfg = rx.config_from_args(["--preset", "seed"])
    plan = rx.plan_workload(cfg, cfg.burst_size, "seed")
    assert [r.prompt for r in plan.burst(0)] == list(rx.SEED_PROMPTS[:6])
    assert {r.max_tokens for r in plan.requests} == {180}


def test_overload_burst_needs_more_than_the_static_share_and_less_than_the_budget():
    cfg = rx.config_from_args(["--preset", "auto"])
    budget = 2 * rx.GIB
    plan = rx.overload_plan(cfg, 12288, budget, "A")
    demand = len(plan.requests) * (plan.prompt_tokens + plan.max_tokens) * 12288
    assert budget / 2 < demand < budget
    assert plan.prompt_tokens + plan.max_tokens <= cfg.max_model_len - 64
    assert plan.max_tokens > cfg.max_tokens  # long outputs
    assert f"{demand / (budget / 2):.1f}x the static share (1.00 GiB), below the pair's budget" in plan.sizing


def test_an_overload_burst_of_two_requests_past_the_budget_says_so():
    # one request of 7,840 + 32 tokens is 3.4 shares of a 0.25 GiB budget: the two sent fill it twice over
    cfg = rx.resolve_config(rx.validate_config(rx.Config(experiments="5", max_model_len=8192, max_tokens=16)))
    plan = rx.overload_plan(cfg, 28672, rx.GIB // 4, "B")
    assert len(plan.requests) == 2 and "0.42 GiB: 3.4x the static share (0.12 GiB), above" in plan.sizing
    assert "WARNING: two requests" in plan.sizing and "--overload-budget-gib" in plan.sizing


def test_an_overload_burst_for_a_model_of_unknown_kv_size_says_it_was_guessed():
    cfg = rx.config_from_args(["--preset", "auto"])
    plan = rx.overload_plan(cfg, None, 2 * rx.GIB, "C")
    assert "x 12288 B =" in plan.sizing
    assert "WARNING: model C's KV bytes per token are unknown" in plan.sizing
    assert "WARNING" not in rx.overload_plan(cfg, 12288, 2 * rx.GIB, "A").sizing


def test_pair_limits_keep_the_pair_within_its_budget():
    segments = {
        "A": {"used_bytes": 100, "prealloc_bytes": 400, "total_bytes": 10**12},
        "B": {"used_bytes": 0, "prealloc_bytes": 500, "total_bytes": 10**12},
    }
    limits = rx.pair_limits(4000, segments)
    assert limits == {"A": 3500, "B": 3500}
    assert rx.pair_limits(300, segments)["A"] == 0


def test_server_commands_and_env_for_both_arms():
    cfg = rx.config_from_args(["--api-key", "k", "--load-format", "dummy"])
    plans = {key: rx.plan_workload(cfg, 2, "x") for key in ("main", "overload_A", "overload_B")}
    specs = {e.name: rx.resolve_experiment(e, cfg, plans, 2 * rx.GIB) for e in rx.EXPERIMENTS}
    (static,) = specs["static"].servers
    (kvc,) = specs["kvcached"].servers
    static_cmd, kvc_cmd = rx.server_command(cfg, static), rx.server_command(cfg, kvc)
    assert static_cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--disable-log-requests" not in static_cmd  # removed in vLLM 0.24: the server exits rc 2
    assert static_cmd[static_cmd.index("--gpu-memory-utilization") + 1] == "0.55"
    assert "--gpu-memory-utilization" not in kvc_cmd
    assert kvc_cmd[kvc_cmd.index("--host") + 1] == "127.0.0.1"
    assert {"--load-format", "dummy"} <= set(kvc_cmd)
    assert "--api-key" not in kvc_cmd, "vLLM logs its arguments: the key travels in VLLM_API_KEY"
    shell = {"ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1", "KVCACHED_IPC_NAME": "theirs"}
    static_env = rx.server_env(cfg, static, shell)
    assert static_env["VLLM_API_KEY"] == "k"
    assert "VLLM_API_KEY" not in rx.server_env(rx.config_from_args([]), static, {"VLLM_API_KEY": "shell's"})
    assert static_env["ENABLE_KVCACHED"] == "false" and static_env["KVCACHED_AUTOPATCH"] == "0"
    assert "KVCACHED_IPC_NAME" not in static_env
    kvc_env = rx.server_env(cfg, kvc, {})
    assert (kvc_env["ENABLE_KVCACHED"], kvc_env["KVCACHED_AUTOPATCH"]) == ("true", "1")
    a, b = specs["shared_kvcached"].servers
    assert rx.server_env(cfg, a, {})["KVCACHED_IPC_NAME"] != rx.server_env(cfg, b, {})["KVCACHED_IPC_NAME"]
    budget_a, budget_b = specs["overload_static"].servers
    assert budget_a.kv_cache_memory_bytes == budget_b.kv_cache_memory_bytes == rx.GIB
    pair = specs["shared_static"].servers
    assert pair[0].gpu_memory_utilization + pair[1].gpu_memory_utilization <= 0.9 + 1e-9


def test_kvcached_env_extension_reaches_only_the_kvcached_arm():
    cfg = rx.config_from_args(["--kvcached-env", "KVCACHED_CONTIGUOUS_LAYOUT=false"])
    kvc = rx.ServerSpec("A", "m", 8001, kvcached=True)
    static = rx.ServerSpec("A", "m", 8001, kvcached=False, gpu_memory_utilization=0.5)
    assert rx.server_env(cfg, kvc, {})["KVCACHED_CONTIGUOUS_LAYOUT"] == "false"
    assert "KVCACHED_CONTIGUOUS_LAYOUT" not in rx.server_env(cfg, static, {})


def test_percentiles_and_empty_inputs():
    assert rx.percentile([], 50) is None
    assert rx.percentile([1, 2, 3, 4], 50) == 2.5
    assert rx.percentile([5], 99) == 5
    assert rx.Distribution.of([]).p50 is None
    assert rx.percentile([0.1, 0.2, 0.4, 1.0], 90) == pytest.approx(0.82)  # linear interpolation


def test_latency_summary_handles_empty_and_all_failed():
    empty = rx.latency_summary([])
    assert empty.requests == 0 and empty.ttft_s.p50 is None and empty.output_tokens_per_s is None
    failed = [
        {"ok": False, "t_send": 10.0, "e2e_s": 0.1, "error": "ConnectionError: refused", "server": "A"}
    ] * 3
    summary = rx.latency_summary(failed)
    assert (summary.requests, summary.ok, summary.failed) == (3, 0, 3)
    assert summary.errors == {"ConnectionError: refused": 3}
    assert summary.ttft_s.p50 is None


def test_latency_summary_tpot_and_throughput():
    rows = [
        {"ok": True, "t_send": 0.0, "ttft_s": 0.1, "e2e_s": 1.1, "completion_tokens": 11},
        {"ok": True, "t_send": 1.0, "ttft_s": 0.3, "e2e_s": 1.3, "completion_tokens": 11},
    ]
    summary = rx.latency_summary(rows)
    assert summary.tpot_s.p50 == pytest.approx(0.1)
    assert summary.output_tokens_per_s == pytest.approx(22 / 2.3)


def test_a_request_row_reads_back_as_the_record_it_was_written_from():
    record = rx.RequestRecord(
        "t", "A", "p", 0, 1, 2, 10.0, ok=True, ttft_s=0.1, e2e_s=1.1, completion_tokens=11
    )
    row = json.loads(json.dumps(rx.record_row(record)))
    assert row["tpot_s"] == pytest.approx(0.1)
    assert rx.RequestRecord.from_row(row) == record
    old = {k: v for k, v in row.items() if k not in ("content_reads", "send_delay_s")}
    assert rx.RequestRecord.from_row(old).content_reads is None, "a row from before content_reads: unknown"


def test_the_runs_first_start_ups_are_named_as_no_measure_of_their_arm():
    # an H100, fresh host: one static server was ready after 48 s first, 26 s in the next run
    servers = {
        "A kvcached": {"started_at": 100.0, "ready_at": 148.0},
        "B kvcached": {"started_at": 101.0, "ready_at": 141.0},  # begun before A was ready
        "A static 0.55": {"started_at": 160.0, "ready_at": 186.0},
        "B static 0.35": {"started_at": 190.0},  # never ready
    }
    line = rx.first_startups_line(servers)
    assert line.startswith("The run's first start-ups (A kvcached, B kvcached: 40-48 s) also pay")
    assert line.endswith("Leave these out when comparing the arms' start-up times.")
    assert rx.first_startups_line({"A kvcached": servers["A kvcached"]}) is None, "nothing to compare"


def test_memory_summary_idle_peak_release():
    samples = [(t / 10, 1000.0) for t in range(0, 20)]  # idle 1000
    samples += [(2 + t / 10, 3000.0) for t in range(0, 10)]  # burst to 3000
    samples += [(3 + t / 10, 2000.0) for t in range(0, 5)]  # releasing
    samples += [(3.5 + t / 10, 1040.0) for t in range(0, 10)]  # back within 5%
    marks = rx.Marks(idle_after_load=(0, 0.9), idle_before=(1.0, 1.9), workload=(2.0, 3.0), sampling_end=4.5)
    summary = rx.memory_summary(samples, marks, 0.05)
    assert summary.idle_before_workload_mib == 1000
    assert summary.peak_mib == 3000
    assert summary.flex_mib == 2000
    assert summary.release_s == pytest.approx(0.5)
    assert summary.residual_mib == pytest.approx(40)
    never = rx.memory_summary([(s[0], 5000.0 if s[0] >= 2 else s[1]) for s in samples], marks, 0.05)
    assert never.release_s is None and never.residual_mib == 4000


def test_a_short_prompt_that_fits_beside_a_long_output_is_taken():
    # 200 - 99 - 64 leaves 37 tokens: the tutorial's prompts (0) and 20 tokens fit, 40 does not
    for prompt in (0, 20):
        flags = ["--max-model-len", "200", "--max-tokens", "99", "--prompt-tokens", str(prompt)]
        assert rx.config_from_args([*flags, "--experiments", "seed"])


def test_static_pool_releases_at_once():
    # not the 0.05 s to the next sample: a pool that never rose above the band has nothing to give back
    flat = [(t / 10 + 0.05, 9000.0) for t in range(50)]
    marks = rx.Marks(idle_after_load=(0, 1), idle_before=(1, 2), workload=(2, 3), sampling_end=5)
    assert rx.memory_summary(flat, marks, 0.05).release_s == pytest.approx(0.0)
    unseen = [(t, v) for t, v in flat if t < 3]  # no sample after the workload: still nothing to give back
    assert rx.memory_summary(unseen, marks, 0.05).release_s == 0
    risen = [(t, 9500.0 if 2 <= t else v) for t, v in unseen]  # above the band, never seen to come back
    assert rx.memory_summary(risen, marks, 0.05).release_s is None


def test_records_serialise_without_absent_sections_and_typos_fail():
    summary = rx.latency_summary([])
    assert "ttft_note" not in rx.to_json(summary)
    assert rx.to_json({"x": float("inf"), "y": [float("nan")]}) == {"x": None, "y": [None]}
    with pytest.raises(AttributeError):
        _ = summary.ttft_p50  # a typo is an error, not "n/a"
    marks = rx.Marks(idle_after_load=(1.0, 2.0), bursts=[rx.BurstMark("burst 1", "A", 0, 3.0, 4.0)])
    assert rx.Marks.from_json(json.loads(json.dumps(rx.to_json(marks)))) == marks


def test_run_folders_are_never_reused(tmp_path):
    import datetime as dt

    now = dt.datetime(2026, 11, 28, 7, 0, 0, tzinfo=dt.timezone.utc)
    first = rx.new_run_dir(tmp_path, "x", now)
    second = rx.new_run_dir(tmp_path, "x", now)
    assert first != second and first.name == "20261128T070000Z_x" and second.exists()


def test_json_has_no_infinity():
    out = json.dumps(rx.to_json({"a": float("inf"), "b": [float("nan"), 1.0]}))
    assert "Infinity" not in out and "NaN" not in out and json.loads(out) == {"a": None, "b": [None, 1.0]}


def test_kvcached_segment_read_and_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(rx, "SHM_DIR", tmp_path)
    (tmp_path / "kvcached_bench_1").write_bytes(rx.SEGMENT.pack(128 * rx.GIB, 96 * rx.MIB, 480 * rx.MIB))
    assert rx.read_segment("kvcached_bench_1") == {
        "total_bytes": 128 * rx.GIB,
        "used_bytes": 96 * rx.MIB,
        "prealloc_bytes": 480 * rx.MIB,
    }
    rx.write_segment_limit("kvcached_bench_1", rx.GIB)
    assert rx.read_segment("kvcached_bench_1")["total_bytes"] == rx.GIB
    assert rx.read_segment("kvcached_bench_1")["used_bytes"] == 96 * rx.MIB
    assert rx.read_segment("absent") is None
    assert rx.remove_segment("kvcached_bench_1")
    assert not (tmp_path / "kvcached_bench_1").exists()


def test_importing_starts_nothing_and_writes_nothing(tmp_path):
    import subprocess

    code = "import run_experiments, threading, sys; print(threading.active_count(), 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(rx.Path(rx.__file__).parent),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["1", "False"]


def test_pair_budget_too_small_for_kvcached_preallocation_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(rx, "SHM_DIR", tmp_path)
    servers = {}
    for name, port in (("A", 1), ("B", 2)):
        spec = rx.ServerSpec(name, "m", port, kvcached=True)
        (tmp_path / spec.ipc_name).write_bytes(rx.SEGMENT.pack(100 * rx.GIB, 96 * rx.MIB, 480 * rx.MIB))
        servers[name] = types.SimpleNamespace(spec=spec, log_path=tmp_path / "log")
    restore = {}
    with pytest.raises(RuntimeError, match="Raise --overload-budget-gib"):
        rx.apply_pair_budget(rx.GIB // 2, servers, restore)
    said: list[str] = []
    monkeypatch.setattr(rx.STATE, "out", said.append)
    limits = rx.apply_pair_budget(4 * rx.GIB, servers, restore)
    assert limits == {"A": 4 * rx.GIB - 576 * rx.MIB, "B": 4 * rx.GIB - 576 * rx.MIB}
    assert said[-1].endswith(
        "4.00 GiB budget less the KV pages the others hold now: the models burst in "
        "turn, so together they stay within it"
    ), "not twice the budget, as the limits add"
    assert rx.read_segment(servers["A"].spec.ipc_name)["total_bytes"] == limits["A"]
    assert restore[servers["A"].spec.ipc_name] == 100 * rx.GIB


def repeat_of(ttft_s: float, e2e_s: float) -> "rx.LatencySummary":
    return rx.latency_summary(
        [{"ok": True, "t_send": 0.0, "ttft_s": ttft_s, "e2e_s": e2e_s, "completion_tokens": 8}]
    )


def test_each_ratio_gets_its_spread_over_repeats_repeat_against_repeat():
    kvcached = [repeat_of(0.1, 1.0), repeat_of(0.3, 1.0), repeat_of(0.2, 2.0)]
    static = [repeat_of(0.2, 1.0), repeat_of(0.1, 2.0), repeat_of(0.2, 1.0)]
    spreads = rx.ratio_spreads(kvcached, static)
    ttft = spreads["ttft_s_p50"]
    assert (ttft.median, ttft.min, ttft.max, ttft.n) == pytest.approx((1.0, 0.5, 3.0, 3))
    assert spreads["e2e_s_p99"] == rx.Spread(1.0, 0.5, 2.0, 3)
    assert rx.ratio_spreads(kvcached[:1], static[:1]) is None, "one repeat has no spread"
    assert rx.ratio_spreads(kvcached, static[:2]) is None, "repeats must pair up"
    assert rx.with_repeats(0.5, spreads["ttft_s_p50"]) == "0.50 (repeats: 1.00 [0.50-3.00])"
    assert rx.with_repeats(0.5, None) == "0.50"


def test_run_comparison_calls_signal_only_what_every_repeat_of_every_run_agrees_on():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_runs

    below = {"min": 0.1, "max": 0.9, "n": 3}
    assert compare_runs.verdict([below, {"min": 0.5, "max": 0.99, "n": 3}]) == "**below 1**"
    assert compare_runs.verdict([below, {"min": 0.5, "max": 1.2, "n": 3}]) == "noise"
    assert compare_runs.verdict([{"min": 1.1, "max": 4.0, "n": 3}] * 2) == "**above 1**"
    assert compare_runs.verdict([below, {"min": 0.5, "max": 0.5, "n": 1}]) == "n/a", (
        "one repeat has no spread"
    )
    reference = ROOT / "results" / "20261128T214012Z_reference_check"
    runs = [
        compare_runs.load(str(reference / name))
        for name in ("20261128T214032Z_reference_1", "20261128T214032Z_reference_2")
    ]
    table = "\n".join(compare_runs.latency_tables(runs))
    assert (
        "| overload, B bursts, A idle, kvcached/static, TTFT p99 | 0.06 [0.06–0.10] / 0.09 [0.09–0.10] | **below 1** |"  # noqa: E501
        in table
    )
    # overload_kvcached reused both servers from an earlier experiment of its run, whose mapped pages count
    # in its level after load (marked); shared_kvcached started its pair fresh (not marked)
    memory = "\n".join(compare_runs.memory_table(runs))
    assert "| overload_kvcached | 13,332 * / 13,334 * | 13,332 / 13,334 |" in memory
    assert (
        "| shared_kvcached | 12,277 / 12,278 | 13,327 / 13,328 |" in memory and "not a fresh load" in memory
    )


def test_memory_cost_is_the_time_weighted_mean_over_the_workload_and_its_integral():
    # 1 GiB for the first hour, 3 GiB for the second; samples outside the workload do not count
    samples = [(-10.0, 99999.0), (0.0, 1024.0), (3600.0, 1024.0), (3600.001, 3072.0), (7200.0, 3072.0)]
    cost = rx.memory_cost(samples + [(7300.0, 99999.0)], (0.0, 7200.0))
    assert cost.mean_mib == pytest.approx(2048, rel=1e-3) and cost.peak_mib == 3072
    assert cost.gib_hours == pytest.approx(4.0, rel=1e-3), "1 GiB x 1 h + 3 GiB x 1 h"
    assert cost.workload_s == 7200 and cost.p95_mib == 3072
    assert rx.memory_cost([(1.0, 5.0)], (0.0, 2.0)) is None, "one sample is no integral"
    assert rx.memory_cost(samples, None) is None, "no workload, no cost"


def test_the_memory_cost_counts_the_workloads_ends_before_its_first_and_after_its_last_sample():
    # the workload starts 0.5 s before the first sample in it and ends 0.2 s after the last: each end at
    # the level of the sample in it nearest to that end, not the one outside (another level)
    samples = [(0.0, 900.0), (1.0, 100.0), (2.0, 300.0), (3.0, 900.0)]
    cost = rx.memory_cost(samples, (0.5, 2.2))
    assert cost.mean_mib == pytest.approx((100 * 0.5 + 200 * 1.0 + 300 * 0.2) / 1.7), "not 200: 1 to 2 s only"
    assert cost.gib_hours == pytest.approx(cost.mean_mib / 1024 * 1.7 / 3600)


def test_the_sleep_paragraph_spells_out_one_and_two_models_only():
    def said(group: str, models: int) -> str:
        sleep = types.SimpleNamespace(servers=dict.fromkeys(range(models)), sleep=None)
        return rx.sleep_paragraph(group, rx.Comparison(figures={}, ratios={}), sleep)

    assert said("single", 1).startswith("**vLLM sleep mode, one model:**"), "no level recorded: none named"
    assert said("shared", 2).startswith("**vLLM sleep mode, two models:**")
    assert said("shared", 3).startswith("**vLLM sleep mode, 3 models:**")
    assert said("shared", 12).startswith("**vLLM sleep mode, 12 models:**"), "not '1two models'"
    routed = rx.SleepSummary(1, rx.Distribution.of([]), rx.Distribution.of([]), router={"A": {}})
    sleep = types.SimpleNamespace(servers=dict.fromkeys(range(2)), sleep=routed)
    paragraph = rx.sleep_paragraph("shared", rx.Comparison(figures={}, ratios={}), sleep)
    assert paragraph.startswith("**vLLM sleep mode, two models (level 1):** asleep before the workload")
    assert "the router below woke each model" in paragraph


def test_the_sleep_paragraph_compares_only_with_the_arms_that_ran():
    def figures(idle: float) -> "rx.Figures":
        return rx.Figures(0.1, 0.2, 1.0, 2.0, idle_before_workload_mib=idle)

    sleep = types.SimpleNamespace(servers={"A": None, "B": None}, sleep=None)
    alone = rx.Comparison(figures={"sleep": figures(2398.0)}, ratios={})
    said = rx.sleep_paragraph("shared", alone, sleep)
    assert "holds 2,398 MiB;" in said and "n/a" not in said, said
    assert said.endswith("No kvcached or static arm ran beside it to compare."), said
    ratios = {"sleep/kvcached": {"ttft_s_p50": 2.71, "e2e_s_p50": 1.45}}
    with_kvcached = rx.Comparison(
        figures={"sleep": figures(2398.0), "kvcached": figures(12144.0)}, ratios=ratios
    )
    said = rx.sleep_paragraph("shared", with_kvcached, sleep)
    assert (
        "holds 2,398 MiB (kvcached idle before the workload 12,144 MiB);" in said and "static" not in said
    ), said
    assert said.endswith("TTFT p50 sleep/kvcached 2.71; E2E p50 1.45."), said


def test_two_sleeping_models_ratios_are_told_per_model_where_one_model_is_starved():
    # pooled over the pair, A's few requests (each waiting seconds for the router) hide in B's many
    def model(ttft: float) -> "rx.Comparison":
        return rx.Comparison(figures={}, ratios={"sleep/kvcached": {"ttft_s_p50": ttft}})

    sleep = types.SimpleNamespace(servers={"A": None, "B": None}, sleep=None)
    pooled = rx.Comparison(
        figures={"sleep": rx.Figures(4.0, 5.0, 5.0, 6.0), "kvcached": rx.Figures(0.02, 0.1, 1.0, 2.0)},
        ratios={"sleep/kvcached": {"ttft_s_p50": 1.03, "e2e_s_p50": 1.2}},
        per_model={"A": model(167.5), "B": model(1.01)},
    )
    said = rx.sleep_paragraph("shared", pooled, sleep)
    assert said.endswith(
        "TTFT p50 sleep/kvcached 1.03; E2E p50 1.20. Per model, TTFT p50 sleep/kvcached A 167.50, B 1.01."
    ), said


def test_elastic_static_ratios_say_how_many_requests_failed_and_had_no_latency():
    def arm(failed: int) -> "rx.Figures":
        return rx.Figures(0.1, 0.2, 1.0, 2.0, failed=failed)

    both = {"kvcached": arm(89), "static": arm(67)}
    rows = [
        ("A bursts, B idle", rx.Comparison(both, {})),
        ("B bursts", rx.Comparison({"kvcached": arm(0)}, {})),
    ]
    assert rx.survivors_note(rows) == (
        "These ratios are over the requests that completed. Failed, with no latency: A bursts, B idle: "
        "kvcached 89, static 67."
    )
    assert rx.survivors_note(rows[1:]) == "", "none failed: nothing to say"
    # the one-model sentence and the sleep paragraph: a static arm that failed most of its requests had
    # its p50 over its fastest few, and read as faster
    one = rx.Comparison({"kvcached": arm(108), "static": arm(153)}, {"kvcached/static": {"ttft_s_p50": 1.21}})
    assert rx.single_lines(one)[-1].endswith(
        "TTFT p50 ratio kvcached/static 1.21, E2E p50 ratio n/a. These ratios are over the requests that "
        "completed. Failed, with no latency: kvcached 108, static 153."
    ), rx.single_lines(one)
    sleep = types.SimpleNamespace(servers={"A": None}, sleep=None)
    with_sleep = rx.Comparison({"sleep": arm(5), "kvcached": arm(0)}, {})
    assert rx.sleep_paragraph("single", with_sleep, sleep).endswith(
        "Failed, with no latency: kvcached 0, sleep 5."
    )


def test_a_reused_sleep_servers_split_says_its_log_holds_an_earlier_experiments_sleeps():
    split = rx.SleepSplit(20, 76360.0, rx.Distribution.of([17724.0]), 952.0)

    def server(reused: bool):
        return types.SimpleNamespace(label="A static 0.55 + sleep mode", reused=reused, sleeps=split)

    summaries = {
        "sleep": types.SimpleNamespace(servers={"A": server(False)}),
        "shared_sleep": types.SimpleNamespace(servers={"A": server(True)}),
    }
    first, again = [line for line in rx.sleep_split_lines(summaries, {}) if line.startswith("- ")]
    assert first.startswith(
        "- sleep, A static 0.55 + sleep mode: over the 20 sleeps in its log (kept for a later experiment: "
        "these include its sleeps), each freed"
    )
    assert again.startswith(
        "- shared_sleep, A static 0.55 + sleep mode: over the 20 sleeps in its log (started for an earlier "
        "experiment: these include that one's sleeps), each freed"
    )


def test_plots_shade_the_discarded_warm_up_apart_from_the_bursts():
    fig, axes = rx.new_figure(1)
    marks = rx.Marks(warmup=(100.0, 102.0), bursts=[rx.BurstMark("main", "A", 1, 104.0, 106.0)])
    rx.shade_bursts(axes[:, 0], marks, t0=100.0)
    spans = sorted((p.get_x(), p.get_width(), p.get_facecolor()[:3]) for p in axes[0][0].patches)
    assert [(x, width) for x, width, _ in spans] == [(0.0, 2.0), (4.0, 2.0)]
    warm_up, burst = (color for _, _, color in spans)
    assert warm_up[0] == warm_up[1] == warm_up[2] and burst != warm_up, (
        "the warm-up in grey, the burst in A's colour"
    )


def test_a_plot_names_what_it_shades_open_loop_windows_or_bursts():
    window = rx.BurstMark("ramp 1", "*", 0, 104.0, 106.0, rate=2.0)
    assert rx.shaded_words(rx.Marks(bursts=[window])).startswith("shaded: windows;")
    assert rx.shaded_words(rx.Marks(bursts=[rx.BurstMark("main", "A", 0, 1.0)])).startswith("shaded: bursts;")


def test_the_footprint_plot_names_the_servers_it_cannot_draw():
    def server(label, weights_mib, footprint=True):
        parts = rx.Footprint(2000.0, weights_mib, 500.0, 300.0, "vLLM's log") if footprint else None
        return types.SimpleNamespace(label=label, footprint=parts)

    servers = {"A": server("A static", 1200.0), "B": server("B static", None), "C": server("C", 1, False)}
    bars, unread = rx.footprint_bars({"static": types.SimpleNamespace(servers=servers)})
    assert list(bars) == ["static\nA static"] and unread == ["static B static"], "asleep (None): not a miss"


def test_a_package_the_run_did_not_find_reads_n_a_in_the_summary_header():
    config = {"versions": {"vllm": "0.24.0", "kvcached": "0.1.6", "torch": None}}
    assert rx.shown_versions(config) == "vLLM 0.24.0, kvcached 0.1.6, torch n/a"
    assert rx.shown_versions({}) == "vLLM n/a, kvcached n/a, torch n/a"


def test_vllms_per_model_figures_cover_the_workload_not_the_discarded_warm_up():
    # a fresh server's warm-up queued 165 requests and was preempted 16 times; a reused one skips it
    rows = [
        {"t": 1.0, "running": 200, "waiting": 165, "preemptions": 0},  # the warm-up
        {"t": 2.0, "running": 0, "waiting": 0, "preemptions": 16},  # idle before the workload
        {"t": 3.0, "running": 100, "waiting": 8, "preemptions": 16},
        {"t": 4.0, "running": 0, "waiting": 0, "preemptions": 20},
        {"t": 9.0, "running": 50, "waiting": 60, "preemptions": 20},  # after it
        {"error": "read failed"},
    ]
    view = rx.VllmView.of(rx.during(rows, (2.5, 4.5)))
    assert (view.max_running, view.max_waiting, view.preemptions) == (100, 8, 4)
    assert rx.during(rows, None) == rows, "no workload mark (killed before it): every row"
    assert rx.VllmView.of(rows[2:3]).preemptions is None, "one reading is a count, not its growth"


def test_the_definitions_state_the_defaults_the_report_computed_with_when_config_json_is_missing():
    text = "\n".join(rx.definitions({}, set()))
    assert "median device memory over 1 s" in text and "within 5% of that idle level" in text
    for tolerance, shown in ((0.005, "0.5%"), (0.025, "2.5%"), (0.07, "7%")):  # as given, not rounded
        text = "\n".join(rx.definitions({"config": {"release_tolerance": tolerance}}, set()))
        assert f"within {shown} of that idle level" in text


def test_an_unknown_experiment_is_answered_with_every_number_and_name():
    with pytest.raises(rx.ConfigError) as refused:
        rx.parse_experiments("8")
    listed = (
        "1 kvcached, 2 static, 3 shared_kvcached, 4 shared_static, 5 overload_kvcached and overload_static"
    )
    assert f"unknown experiment '8'; choose names or numbers from {listed}, 6 sleep" in str(refused.value)


def test_a_burst_is_sized_with_the_prompts_cut_to_fit_the_context():
    gpu = {"free_mib_at_start": 15_000.0}
    cfg = rx.resolve_config(rx.validate_config(rx.Config(max_model_len=512)))  # 768-token prompts do not fit
    size, why = rx.workload_sizing(cfg, 12288, gpu)
    plan = rx.plan_workload(cfg, size, why)
    assert plan.prompt_tokens < 768 and f"({plan.prompt_tokens} prompt + 128 output tokens)" in why
    assert size == rx.size_burst(12288, 15_000 * rx.MIB, plan.prompt_tokens, 128, 0.05, 256)[0]


def test_report_sentences_leave_out_what_is_n_a_and_say_more_where_kvcached_holds_more():
    def block(static_idle, static_peak):
        figures = {
            "kvcached": rx.Figures(0.1, 0.2, 1.0, 2.0, peak_mib=2124.0, idle_after_load_mib=2056.0),
            "static": rx.Figures(0.1, 0.2, 1.0, 2.0, peak_mib=static_peak, idle_after_load_mib=static_idle),
        }
        return "\n".join(rx.single_lines(rx.Comparison(figures=figures, ratios={})))

    assert "kvcached keeps 845 MiB more when idle after loading and 913 MiB more at peak" in block(
        1211.0, 1211.0
    )
    assert "kvcached keeps 7,655 MiB less when idle" in block(9711.0, 9711.0)
    warmed = {
        "kvcached": rx.Figures(
            0.1, 0.2, 1.0, 2.0, peak_mib=2124.0, idle_after_load_mib=2056.0, idle_before_workload_mib=2120.0
        ),
        "static": rx.Figures(
            0.1, 0.2, 1.0, 2.0, peak_mib=9711.0, idle_after_load_mib=9711.0, idle_before_workload_mib=9711.0
        ),
    }
    assert (
        "kvcached keeps 7,655 MiB less when idle after loading, 7,591 MiB less idle before the workload and "
        "7,587 MiB less at peak"
    ) in "\n".join(rx.single_lines(rx.Comparison(figures=warmed, ratios={}))), (
        "the pages a warm-up left count"
    )
    assert "n/a MiB" not in block(None, None) and "memory n/a for one of the arms" in block(None, None)
    server = types.SimpleNamespace(label="A static 0.55 + sleep mode", reused=False)
    no_lines = rx.SleepSplit(2, 8714.0, rx.Distribution.of([]), None)
    said = rx.sleep_split_line("sleep", server, no_lines, kept=False)
    assert "n/a" not in said and said.endswith("(weights and KV, 8,714 MiB).")
    lanes = rx.Timing(765, 19, 745, 273, 605, 19, 0.025, lanes={"0": {}, "1": {}})
    assert "(on 2 cards at once" in rx.time_line(lanes)[-1]


def test_shares_are_rounded_down_to_tenths_and_a_tiny_negative_is_no_minus_zero():
    assert rx.share_to_tenths(0.9995) == "99.9%" and rx.share_to_tenths(1.0) == "100.0%"
    assert rx.signed_tenths(-0.04) == "0.0" and rx.signed_tenths(-0.06) == "-0.1"


def test_a_models_name_in_tables_and_plots_is_its_last_path_part_with_or_without_a_slash():
    # `--models /m/a/,/m/b/` showed "A: " with no name in the per-model table and its plot
    assert [rx.model_name(m) for m in ("/m/a/", "Qwen/Qwen2.5-0.5B-Instruct", "org/b", "/")] == [
        "a",
        "Qwen2.5-0.5B-Instruct",
        "b",
        "/",
    ]


def test_the_sleep_arms_memory_cost_counts_its_last_fall_asleep_as_it_counts_the_others():
    # the workload ended with the last burst: the fall-asleep after it was left out, those after the
    # earlier bursts counted; two identical models under the router read 1,904 and 1,236 MiB
    burst = rx.BurstMark("burst 2", "A", 0, 10.0, end=12.0)
    burst.sleep_s = 0.3
    marks = rx.Marks(workload=(5.0, 12.0), bursts=[burst])
    assert rx.serving_span(marks) == (5.0, 12.3)
    assert rx.serving_span(dataclasses.replace(marks, asleep=12.8)) == (5.0, 12.8), "the router's last"
    burst.sleep_s = None
    assert rx.serving_span(marks) == (5.0, 12.0), "no sleep arm: the workload"
    assert rx.serving_span(rx.Marks()) is None


def test_ratios_from_one_run_of_each_arm_are_said_to_be_one_run():
    one = rx.Comparison(figures={}, ratios={"kvcached/static": {"ttft_s_p50": 0.4}})
    (note,) = [line for line in rx.one_run_note({"single": one}) if line]
    assert note.startswith("These ratios come from one run of each arm") and "--repeats 3" in note
    spread = {"kvcached/static": {"ttft_s_p50": rx.Spread(0.4, 0.3, 0.5, 3)}}
    repeated = rx.Comparison(figures={}, ratios=one.ratios, over_repeats=spread)
    assert rx.one_run_note({"single": repeated}) == [], "the spread over repeats says it"
    assert rx.one_run_note({}) == []


def test_responses_the_model_ended_early_are_said_with_the_flag_that_keeps_them_long():
    def ran(tokens, ok):
        return types.SimpleNamespace(latency=types.SimpleNamespace(output_tokens=tokens, ok=ok))

    config = {"config": {"max_tokens": 128, "ignore_eos": False, "output_tokens_dist": "fixed"}}
    summaries = {"kvcached": ran(69 * 8, 8), "static": ran(69 * 8, 8), "overload_static": ran(10, 8)}
    (note,) = [line for line in rx.short_outputs_note(config, summaries) if line]
    assert note.startswith("Responses averaged 69 of the 128 output tokens planned (--max-tokens)")
    assert note.endswith("--ignore-eos makes every response as long as planned.")
    assert rx.short_outputs_note(config, {"kvcached": ran(120 * 8, 8)}) == [], "within 10%: nothing to say"
    kept = {"config": {**config["config"], "ignore_eos": True}}
    assert rx.short_outputs_note(kept, summaries) == [], "as long as planned, or failed for it"


def test_a_static_kv_budget_label_is_rounded_to_three_figures():
    third = rx.ServerSpec("A", "m", 1, kvcached=False, kv_cache_memory_bytes=rx.GIB * 2 // 3)
    assert third.label == "A static 0.667 GiB KV", "not 0.666667"
    assert (
        rx.ServerSpec("B", "m", 2, kvcached=False, kv_cache_memory_bytes=2 * rx.GIB).label
        == "B static 2 GiB KV"
    )


def test_a_pair_group_says_the_whole_cards_saving_before_the_workload_and_at_peak():
    figures = {
        "kvcached": rx.Figures(
            0.1,
            0.2,
            1.0,
            2.0,
            peak_mib=18932.0,
            idle_after_load_mib=12277.0,
            idle_before_workload_mib=13327.0,
        ),
        "static": rx.Figures(
            0.1,
            0.2,
            1.0,
            2.0,
            peak_mib=130828.0,
            idle_after_load_mib=130820.0,
            idle_before_workload_mib=130826.0,
        ),
    }
    said = rx.memory_words(rx.Comparison(figures=figures, ratios={}), "the static split", fresh=False)
    assert said == (
        "kvcached keeps 117,499 MiB less idle before the workload and 111,896 MiB less at peak than the "
        "static split"
    ), "not after load: a reused server's level there is where an earlier experiment left it"

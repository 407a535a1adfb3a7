"""N models on one card: --models names slots A, B, C, ...; every experiment that shares the card takes
them all (kvcached together, static shares one at a time, sleep mode one awake at a time, one overload
budget split N ways); bad lists, shares and ports are refused before anything starts."""

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
from conftest import background, consecutive_ports, fake_env, in_process_args, rx, script_args, succeeded_run

THREE = "Qwen/Qwen2.5-0.5B-Instruct,Qwen/Qwen2.5-1.5B-Instruct,Qwen/Qwen2.5-0.5B-Instruct"
SHARED = ["shared_kvcached", "shared_static", "overload_kvcached", "overload_static", "shared_sleep"]


@background("three_models_run", weight=20)
def three_models_run_cmd(base):
    (base / "gpu").mkdir()
    first = consecutive_ports(3)
    (base / "port").write_text(str(first))
    args = script_args(
        base / "results", "--models", THREE, "--port", str(first), "--experiments", "3,4,5,7", "--bursts", "1"
    )
    # 30 ms a token: each burst lasts half a second, several process samples of each awake sleeping model
    return dict(args=args, env=fake_env(base / "gpu", FAKE_ITL_S="0.03"), timeout=240)


@pytest.fixture(scope="module")
def three_models_run(background_runs):
    run_dir = succeeded_run(background_runs, "three_models_run")
    port = int((run_dir.parent.parent / "port").read_text())
    return run_dir, json.loads((run_dir / "summary.json").read_text()), port


def test_three_models_run_every_shared_experiment_with_three_servers(three_models_run):
    run_dir, summary, port = three_models_run
    assert sorted(summary["experiments"]) == sorted(SHARED)
    for name in SHARED:
        servers = summary["experiments"][name]["servers"]
        assert sorted(servers) == ["A", "B", "C"], name
        assert all(s["latency"]["ok"] > 0 and s["latency"]["failed"] == 0 for s in servers.values()), name
        assert all(s["memory"]["peak_mib"] for s in servers.values()), name
    record = json.loads(next(run_dir.glob("*_shared_kvcached/experiment.json")).read_text())
    assert [s["spec"]["port"] for s in record["servers"]] == [port, port + 1, port + 2]
    assert [s["spec"]["model"] for s in record["servers"]] == THREE.split(",")
    assert len({s["started_at"] for s in record["servers"]}) == 3 and all(
        len(s["started_together_with"]) == 2 for s in record["servers"]
    ), "the elastic three start together"


def test_three_static_shares_split_the_card_and_one_budget_splits_three_ways(three_models_run):
    run_dir, summary, _ = three_models_run
    static = json.loads(next(run_dir.glob("*_shared_static/experiment.json")).read_text())
    assert [s["spec"]["gpu_memory_utilization"] for s in static["servers"]] == [0.3, 0.3, 0.3]
    overload = json.loads(next(run_dir.glob("*_overload_static/experiment.json")).read_text())
    budget = json.loads((run_dir / "config.json").read_text())["overload_budget_bytes"]
    assert [s["spec"]["kv_cache_memory_bytes"] for s in overload["servers"]] == [budget // 3] * 3
    limits = json.loads(next(run_dir.glob("*_overload_kvcached/experiment.json")).read_text())["kv_limits"]
    assert sorted(limits) == ["A", "B", "C"]
    phases = summary["comparison"]["overload"]["per_phase"]
    assert sorted(phases) == ["A bursts, B, C idle", "B bursts, A, C idle", "C bursts, A, B idle"]
    assert sorted(summary["comparison"]["shared"]["per_model"]) == ["A", "B", "C"]


def test_bursts_alternate_over_all_three_and_the_summary_says_three_models(three_models_run):
    run_dir, summary, _ = three_models_run
    phases = list(summary["experiments"]["shared_kvcached"]["phases"])
    assert phases[:3] == ["A burst 1", "B burst 1", "C burst 1"]
    per_model = summary["comparison"]["shared"]["per_model"]
    assert all({"kvcached", "static", "sleep"} <= set(per_model[slot]["figures"]) for slot in "ABC")
    assert "**vLLM sleep mode, 3 models (level 1):**" in (run_dir / "summary.md").read_text()


# --- refused before launch, naming the flag ---------------------------------------------------------
@pytest.mark.parametrize(
    "flags, said",
    [
        (["--static-shares", "0.4,0.4,0.4"], "--static-shares: sum to 1.2: at most 0.95 of the card"),
        (["--static-shares", "0.3,0.3"], "--static-shares: gives 2 shares for 3 models"),
        (["--static-shares", "0.3,x,0.3"], "--static-shares: must be fractions separated by commas"),
        (["--port", "65534"], "--port: leaves no TCP port for model C"),
    ],
)
def test_bad_model_lists_shares_and_ports_are_refused_before_launch(flags, said, tmp_path, capsys):
    args = in_process_args(tmp_path / "r", "--models", THREE, "--experiments", "3,4", *flags)
    assert rx.main(args) == 2
    assert f"error: {said}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())


def test_a_large_static_share_is_refused_only_where_it_leaves_model_b_nothing():
    def check(**flags):
        return rx.validate_config(rx.Config(gpu_memory_utilization=0.9, **flags))

    with pytest.raises(rx.ConfigError, match="--gpu-memory-utilization: leaves no room for model B"):
        check(experiments="4")
    assert check(experiments="1,2,6"), "no static split in the run: the share is the lone server's"
    assert check(experiments="4", pair_utilization_b=0.05) and check(
        experiments="4", static_shares="0.45,0.45"
    )


def test_shares_that_sum_to_exactly_the_limit_pass_whatever_the_floating_point_says():
    assert rx.validate_config(rx.Config(experiments="4", static_shares="0.9,0.05")), "0.9 + 0.05 is 0.95"
    assert rx.validate_config(rx.Config(experiments="4", gpu_memory_utilization=0.9, pair_utilization_b=0.05))
    with pytest.raises(rx.ConfigError, match="--static-shares: sum to 0.96: at most 0.95 of the card"):
        rx.validate_config(rx.Config(experiments="4", static_shares="0.9,0.06"))


def test_one_model_cannot_share_the_card(tmp_path, capsys):
    args = in_process_args(tmp_path / "r", "--models", "Qwen/Qwen2.5-0.5B-Instruct", "--experiments", "3")
    assert rx.main(args) == 2
    assert "--models: one model cannot share the card in shared_kvcached" in capsys.readouterr().err


SEVEN_B = {  # Qwen2.5-7B's shapes: about 14 GiB of weights
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "intermediate_size": 18944,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
HALF_B = dict(
    SEVEN_B,
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    intermediate_size=4864,
    tie_word_embeddings=True,
)  # Qwen2.5-0.5B
ONE_AND_HALF_B = dict(
    HALF_B, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960
)
THIRTY_TWO_B = dict(
    SEVEN_B,
    hidden_size=5120,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    intermediate_size=27648,
)  # Qwen2.5-32B
LARGE_VOCABULARY = dict(HALF_B, vocab_size=262144)  # Gemma's vocabulary on the 0.5B model


def model_folder(base: Path, config: dict) -> str:
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps(config))
    return str(base)


@pytest.mark.parametrize(
    "models, shares, said",
    [
        ("small", "0.05,0.3,0.3", "✗ static split: model A's share 0.05 (819 MiB) cannot hold its weights"),
        ("7b", "", "✗ static split: 3 models need"),
    ],
)
def test_shares_too_small_for_a_model_or_a_card_too_small_for_them_all_fail_the_preflight(
    models, shares, said, fake_gpu, tmp_path, capsys
):
    listed = (
        THREE
        if models == "small"
        else ",".join([model_folder(tmp_path / f"m{i}", SEVEN_B) for i in range(3)])
    )
    args = in_process_args(tmp_path / "r", "--models", listed, "--experiments", "4")
    args += ["--static-shares", shares] if shares else []
    assert rx.main(args, nvml_module=fake_gpu) == 2
    err = capsys.readouterr().err
    assert "preflight failed, nothing was started" in err and said in err
    assert not list(Path(os.environ["FAKE_GPU_DIR"]).glob("*.json")), "no server started"


def test_sleeping_models_take_turns_each_at_the_full_share(three_models_run):
    """Each starts while the others sleep, at the same share; only the model that bursts is ever awake."""
    run_dir, summary, _ = three_models_run
    exp = next(run_dir.glob("*_shared_sleep"))
    rows = rx.read_jsonl(exp / "memory.jsonl")
    record = json.loads((exp / "experiment.json").read_text())
    servers = summary["experiments"]["shared_sleep"]["servers"]
    for slot in "ABC":
        assert servers[slot]["memory"]["peak_mib"] > 0.5 * 16384, "each gets the static arm's share awake"
    awake = {
        slot: {
            r["t"]
            for r in rows
            if r.get("kind") == "process" and r.get("server") == slot and r["used_mib"] > 0.5 * 16384
        }
        for slot in "ABC"
    }
    assert all(awake.values())
    assert not (awake["A"] & awake["B"] or awake["A"] & awake["C"] or awake["B"] & awake["C"]), (
        "one at a time"
    )
    assert all(b["wake_s"] is not None and b["sleep_s"] is not None for b in record["marks"]["bursts"])
    assert "sleep" in summary["comparison"]["shared"]["figures"]


ROOM_FAILURE = re.compile(r"✗ (?:models fit|static split): .*\n +fix: (.*)")


def room_fix(out: str, experiments: str = "1,2,3,4,5,6,7") -> list[str]:
    """The flags the first failed room check names as its fix ([] where it names none), with shared_static
    (4) left out of `experiments` where the fix says so."""
    failed = ROOM_FAILURE.search(out)
    assert failed, out
    flags = [
        part
        for flag in re.findall(r"--[a-z-]+ [0-9.]+(?:,[0-9.]+)*", failed.group(1))
        for part in flag.split()
    ]
    others = ",".join(e for e in experiments.split(",") if e != "4")
    without_split = ["--experiments", others] if "shared_static left out" in failed.group(1) else []
    return flags + without_split


@pytest.mark.parametrize(
    "card_mib, flags",
    [
        (16384, ["--experiments", "4", "--gpu-memory-utilization", "0.8"]),  # B's 0.90 - A's too small
        (16384, ["--experiments", "4", "--pair-utilization-b", "0.1"]),
        (24576, ["--model-b", "7b"]),  # shared_sleep's B at A's share, shared_static's B at 0.90 - A's
        (24576, ["--model-b", "7b", "--experiments", "4", "--pair-utilization-b", "0.3"]),
        (
            24576,
            [
                "--model-a",
                "7b",
                "--experiments",
                "4",
                "--gpu-memory-utilization",
                "0.3",
                "--pair-utilization-b",
                "0.6",
            ],
        ),
        (  # under kvcached the three with each server's own rest do not fit 24 GiB
            24576,
            [
                "--models",
                "Qwen/Qwen2.5-0.5B-Instruct,7b,Qwen/Qwen2.5-1.5B-Instruct",
                "--experiments",
                "2,4,6,7",
            ],
        ),
    ],
)
def test_the_room_checks_fix_names_flags_that_pass_them(
    card_mib, flags, fake_gpu, tmp_path, monkeypatch, capsys
):
    """A static share too small for its model: the fix names flags, and with them every check passes
    (before, the static-arm and split checks could each undo the other's advice)."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", str(card_mib))
    seven_b = model_folder(tmp_path / "7b", SEVEN_B)
    flags = [re.sub(r"(?<![\w.])7b(?![\w.])", seven_b, flag) for flag in flags]
    args = in_process_args(tmp_path / "r", "--check", *flags)
    assert rx.main(args, nvml_module=fake_gpu) == 2
    given = flags[flags.index("--experiments") + 1] if "--experiments" in flags else "1,2,3,4,5,6,7"
    fix = room_fix(capsys.readouterr().out, given)
    assert fix, "the fix names flags"
    assert rx.main([*args, *fix], nvml_module=fake_gpu) == 0, (fix, capsys.readouterr())


def test_a_model_no_share_leaves_room_beside_is_told_to_shrink_not_given_a_share(fake_gpu, tmp_path, capsys):
    """A 14 GiB model on a 16 GiB card: 0.9 holds its weights and one request, but not vLLM's own workspace
    beside them (0.97 GiB at the 2,048 batched tokens of a card below 70 GiB), so the fix names no share that
    would fail minutes in."""
    seven_b = model_folder(tmp_path / "7b", SEVEN_B)
    args = in_process_args(tmp_path / "r", "--check", "--model-a", seven_b, "--experiments", "2")
    assert rx.main(args, nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "fix: a smaller model, a shorter --max-model-len, or leave static out of --experiments" in out
    assert room_fix(out) == []


def test_an_overload_budget_the_kvcached_pair_cannot_map_is_refused_naming_the_budget_that_fits(
    fake_gpu, tmp_path, capsys
):
    # 12 GiB: model B's burst (1.4 x 6 GiB) beside both models' weights and rests is past a 16 GiB card, and
    # its requests would wait for KV pages until they time out
    args = in_process_args(tmp_path / "r", "--check", "--experiments", "overload_kvcached")
    assert rx.main([*args, "--overload-budget-gib", "12"], nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "overload_kvcached: the weights of model A, B" in out and "and the overload burst take" in out
    (fits,) = re.findall(r"fix: --overload-budget-gib ([\d.]+), or a smaller model", out)
    assert 4 < float(fits) < 12
    assert rx.main([*args, "--overload-budget-gib", fits], nvml_module=fake_gpu) == 0, (
        "the fix it names holds"
    )


def test_a_quantized_model_or_resizing_server_flags_are_not_sized_from_config_json(
    fake_gpu, tmp_path, capsys
):
    """config.json's sizes at 16 bits would refuse a 4-bit 7B model at the static arm's 0.55 of 16 GiB."""
    awq = model_folder(
        tmp_path / "awq", {**SEVEN_B, "quantization_config": {"bits": 4, "quant_method": "awq"}}
    )
    args = in_process_args(tmp_path / "r", "--check", "--model-a", awq, "--experiments", "2")
    assert rx.main(args, nvml_module=fake_gpu) == 0
    assert "! models fit: not checked: model A is quantized" in capsys.readouterr().out
    seven_b = model_folder(tmp_path / "7b", SEVEN_B)
    args = in_process_args(tmp_path / "s", "--check", "--model-a", seven_b, "--experiments", "2")
    assert (
        rx.main(
            [*args, "--extra-server-args", "--kv-cache-dtype fp8 --quantization fp8"], nvml_module=fake_gpu
        )
        == 0
    )
    assert "! models fit: not checked: --extra-server-args sets --kv-cache-dtype" in capsys.readouterr().out
    # a T4's --dtype half serves the 16 bits the checks size: the 7B is still refused at 0.55 of 16 GiB
    assert rx.main([*args, "--extra-server-args=--dtype half"], nvml_module=fake_gpu) == 2
    assert "✗ models fit" in capsys.readouterr().out
    assert rx.main([*args, "--extra-server-args=--dtype=float32"], nvml_module=fake_gpu) == 0  # 4 bytes


def test_a_model_too_large_for_its_static_share_or_beside_another_fails_the_preflight(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    """14 GiB of weights: half of a 24 GiB card cannot hold them (the fix names the share that does, with
    room for vLLM's workspace, and it passes); two such models cannot share the card, under kvcached or
    with fixed KV pools, while one beside a small model can."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "24576")
    seven_b = [model_folder(tmp_path / f"m{i}", SEVEN_B) for i in range(2)]
    args = in_process_args(tmp_path / "r", "--check", "--model-a", seven_b[0], "--model-b", seven_b[1])
    assert (
        rx.main([*args, "--experiments", "2", "--gpu-memory-utilization", "0.5"], nvml_module=fake_gpu) == 2
    )
    out = capsys.readouterr().out
    assert "✗ models fit: static: model A at --gpu-memory-utilization 0.5 (12,288 MiB) cannot hold" in out
    share = re.search(r"fix: --gpu-memory-utilization ([0-9.]+)", out).group(1)
    room, _ = rx.model_room(rx.Config(model_a=seven_b[0]), "A", SMALL_BATCH)  # a 24 GiB card samples 256 rows
    assert float(share) * 24576 * rx.MIB >= room.advised > room.weights + room.request_kv + rx.GIB // 2
    assert (
        rx.main([*args, "--experiments", "2", "--gpu-memory-utilization", share], nvml_module=fake_gpu) == 0
    )
    assert "✓ models fit" in capsys.readouterr().out
    assert rx.main([*args, "--experiments", "overload_static"], nvml_module=fake_gpu) == 2
    assert "✗ models fit: overload_static: the weights of model A, B, " in capsys.readouterr().out
    small = model_folder(tmp_path / "small", {**SEVEN_B, "num_hidden_layers": 4, "hidden_size": 896})
    overload = ["--experiments", "overload_static", "--model-b", small]
    assert rx.main([*args, *overload], nvml_module=fake_gpu) == 0, "a KV pool of fixed size needs no share"
    assert "✓ models fit" in capsys.readouterr().out
    assert rx.main([*args, "--experiments", "3"], nvml_module=fake_gpu) == 2
    assert "✗ models fit: shared_kvcached: the weights of model A, B, " in capsys.readouterr().out
    assert not list(Path(os.environ["FAKE_GPU_DIR"]).glob("*.json")), "no server started"


def test_a_max_model_len_past_the_models_own_limit_fails_naming_the_limit(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    default_rope = {"rope_type": "default", "rope_theta": 1e6}  # no stretch: newer configs always name one
    short = model_folder(
        tmp_path / "short", {**HALF_B, "max_position_embeddings": 4096, "rope_parameters": default_rope}
    )
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    stretched = model_folder(
        tmp_path / "yarn", {**HALF_B, "max_position_embeddings": 4096, "rope_scaling": yarn}
    )
    args = in_process_args(
        tmp_path / "r", "--check", "--model-a", short, "--model-b", short, "--experiments", "1"
    )
    assert rx.main([*args, "--max-model-len", "8192"], nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "✗ model A: " in out and "takes at most 4,096 tokens (max_position_embeddings)" in out
    assert "fix: --max-model-len 4096" in out
    assert rx.main([*args, "--max-model-len", "4096"], nvml_module=fake_gpu) == 0
    yarn_args = in_process_args(
        tmp_path / "r", "--check", "--models", f"{stretched},{stretched}", "--experiments", "1"
    )
    assert rx.main([*yarn_args, "--max-model-len", "8192"], nvml_module=fake_gpu) == 0, "left to vLLM"
    # vLLM multiplies no limit by Llama 3.x's or Phi-3's factor: it refused these at every server start
    llama3 = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192}
    unstretched = model_folder(
        tmp_path / "llama3", {**HALF_B, "max_position_embeddings": 4096, "rope_scaling": llama3}
    )
    llama3_args = in_process_args(
        tmp_path / "r", "--check", "--models", f"{unstretched},{unstretched}", "--experiments", "1"
    )
    assert rx.main([*llama3_args, "--max-model-len", "8192"], nvml_module=fake_gpu) == 2
    assert "takes at most 4,096 tokens" in capsys.readouterr().out
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own way to allow it
    assert rx.main([*args, "--max-model-len", "8192"], nvml_module=fake_gpu) == 0


def test_fixed_kv_pools_need_the_start_gate_free_for_each_server_not_a_share_each(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    """overload_static's servers pass --gpu-memory-utilization 0.2 only as vLLM's start-up gate: five small
    models fit an 80 GB card; two 7B ones and a small one fit 40 GB, but leave the last too little free to
    start."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "81559")
    small = ",".join(model_folder(tmp_path / f"s{i}", HALF_B) for i in range(5))
    args = in_process_args(tmp_path / "r", "--check", "--models", small, "--experiments", "overload_static")
    assert rx.main(args, nvml_module=fake_gpu) == 0, capsys.readouterr().out
    capsys.readouterr()
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "40960")
    large = ",".join([*(model_folder(tmp_path / f"l{i}", SEVEN_B) for i in range(2)), small.split(",")[0]])
    args = in_process_args(tmp_path / "r", "--check", "--models", large, "--experiments", "overload_static")
    assert rx.main([*args, "--overload-budget-gib", "1"], nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "✗ models fit: overload_static: vLLM starts a server only where 0.2 of the card (8,192 MiB)" in out
    # the fix names the budget whose earlier pools leave the gate open, and that budget passes; so it does
    # for the default models on a 16 GiB card, where the budget alone shut it (not "smaller models")
    (fits,) = re.findall(r"fix: --overload-budget-gib ([\d.]+), or a smaller model", out)
    assert rx.main([*args, "--overload-budget-gib", fits], nvml_module=fake_gpu) == 0, (
        "the fix it names holds"
    )
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "16384")
    args = in_process_args(tmp_path / "s", "--check", "--experiments", "overload_static")
    assert rx.main([*args, "--overload-budget-gib", "20"], nvml_module=fake_gpu) == 2
    (fits,) = re.findall(r"fix: --overload-budget-gib ([\d.]+), or a smaller model", capsys.readouterr().out)
    assert rx.main([*args, "--overload-budget-gib", fits], nvml_module=fake_gpu) == 0, (
        "the fix it names holds"
    )


def test_a_fixed_kv_pool_too_small_for_one_request_fails_and_its_fix_passes(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    """32k tokens of Qwen2.5-7B's KV is 1.75 GiB: a 2 GiB budget split two ways gives each pool 1 GiB, and
    vLLM would refuse to start; the budget the fix names holds a request in each pool."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "81559")
    seven_b = [model_folder(tmp_path / f"m{i}", SEVEN_B) for i in range(2)]
    args = in_process_args(tmp_path / "r", "--check", "--model-a", seven_b[0], "--model-b", seven_b[1])
    args += ["--experiments", "overload_static", "--max-model-len", "32768"]
    assert rx.main([*args, "--overload-budget-gib", "2"], nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert (
        "✗ models fit: overload_static: model A's KV pool of 1,024 MiB (the --overload-budget-gib split 2"
        in out
    )
    budget = re.search(r"fix: --overload-budget-gib ([0-9.]+)", out).group(1)
    assert budget == "3.5"
    assert rx.main([*args, "--overload-budget-gib", budget], nvml_module=fake_gpu) == 0
    assert "✓ models fit" in capsys.readouterr().out


def test_where_no_split_holds_the_models_the_lone_servers_fix_leaves_shared_static_out(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    """Two 14 GiB models on 24 GiB: each runs alone at 0.7, which no split of the card gives both; the fix
    says to leave shared_static out, and then every check holds."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "24576")
    seven_b = [model_folder(tmp_path / f"m{i}", SEVEN_B) for i in range(2)]
    args = ["--check", "--model-a", seven_b[0], "--model-b", seven_b[1], "--experiments", "2,4,6"]
    args = in_process_args(tmp_path / "r", *args)
    assert rx.main(args, nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    share = rx.least_share(
        rx.model_room(rx.Config(model_a=seven_b[0]), "A", SMALL_BATCH)[0].advised, 24 * rx.GIB
    )
    assert f"fix: --gpu-memory-utilization {share:g}, with shared_static left out of --experiments" in out
    assert rx.main([*args, *room_fix(out)[:2], "--experiments", "2,6"], nvml_module=fake_gpu) == 0


@pytest.mark.parametrize(
    "total_gib, name, extra, rows",
    [
        (16, "Tesla T4", "", 256),
        (80, "NVIDIA H100 80GB HBM3", "", 1024),
        (80, "NVIDIA A100-SXM4-80GB", "", 256),  # vLLM keeps an A100 at the smaller batch
        (141, "NVIDIA H200", "--max-num-batched-tokens 512", 512),
        (141, "NVIDIA H200", "--max-num-seqs=64 --max-num-batched-tokens 16384", 64),
        (16, "Tesla T4", "--enforce-eager --max-num-seqs 1024", 1024),
    ],
)
def test_vllms_own_memory_follows_the_batch_it_picks_for_the_card(total_gib, name, extra, rows):
    cfg = rx.Config(extra_server_args=extra)
    assert rx.vllm_batch(cfg, total_gib * rx.GIB, name).rows == rows


def test_a_batch_past_the_measured_one_is_a_warning_that_names_the_flag(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "81559")
    monkeypatch.setenv("FAKE_GPU_NAME", "NVIDIA H100 80GB HBM3")
    args = in_process_args(tmp_path / "r", "--check", "--experiments", "2")
    assert (
        rx.main([*args, "--extra-server-args", "--max-num-batched-tokens 32768"], nvml_module=fake_gpu) == 0
    )
    assert "batch:" not in capsys.readouterr().out
    assert (
        rx.main([*args, "--extra-server-args", "--max-num-batched-tokens 65536"], nvml_module=fake_gpu) == 0
    )
    out = capsys.readouterr().out
    assert "--max-num-batched-tokens 65,536 is past the 32,768 measured" in out and "✓ models fit" in out


def test_a_share_that_holds_the_weights_and_one_request_but_not_vllms_workspace_is_refused(
    fake_gpu, tmp_path, capsys
):
    """vLLM fails such a share minutes in ("Available KV cache memory: -0.93 GiB" for the 0.5B model at
    0.03 of an H100); the preflight now refuses it, and the share it advises passes."""
    half_b = model_folder(tmp_path / "m", {**SEVEN_B, "num_hidden_layers": 4, "hidden_size": 896})
    args = in_process_args(tmp_path / "r", "--check", "--model-a", half_b, "--experiments", "2")
    room, _ = rx.model_room(rx.Config(model_a=half_b), "A", SMALL_BATCH)
    card = 16 * rx.GIB
    between = rx.least_share(room.weights + room.request_kv, card)
    assert between * card < room.static_need, "the share holds no workspace"
    assert rx.main([*args, "--gpu-memory-utilization", str(between)], nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "one request of --max-model-len and vLLM's workspace" in out
    advised = room_fix(out, "2")
    assert float(advised[1]) * card >= room.advised
    assert rx.main([*args, *advised], nvml_module=fake_gpu) == 0


# vLLM 0.24's workspace on an H100 (results/REFERENCE.md, "vLLM's own memory for larger models and
# vocabularies"): (shape, rows its sampler profiled, vLLM's "Model loading took" GiB, workspace GiB).
# vLLM's batches: a small card's, a large card's, and 16k and 32k tokens at the large card's 1,024 sequences
SMALL_BATCH, LARGE_BATCH = rx.VllmBatch(2048, 256), rx.VllmBatch(8192, 1024)
BATCH_16K, BATCH_32K = rx.VllmBatch(16384, 1024), rx.VllmBatch(32768, 1024)
MEASURED_WORKSPACE = [  # on an H100 (results/REFERENCE.md)
    (LARGE_VOCABULARY, LARGE_BATCH, 1.11, 3.93),
    (LARGE_VOCABULARY, SMALL_BATCH, 1.11, 1.29),
    (THIRTY_TWO_B, LARGE_BATCH, 61.04, 2.86),
    (THIRTY_TWO_B, SMALL_BATCH, 61.04, 1.26),
    (SEVEN_B, LARGE_BATCH, 14.29, 2.55),
    (SEVEN_B, SMALL_BATCH, 14.29, 0.97),
    # past 8,192 tokens the forward pass's MLP activations outgrow the sampler's logits
    (SEVEN_B, BATCH_16K, 14.29, 2.62),
    (SEVEN_B, BATCH_32K, 14.29, 4.74),
]


@pytest.mark.parametrize("shape, batch, weights_gib, workspace_gib", MEASURED_WORKSPACE)
def test_vllms_workspace_grows_with_the_vocabulary_the_model_and_the_batch_as_measured(
    tmp_path, shape, batch, weights_gib, workspace_gib
):
    """The room checks refuse below the least and advise the most: with the weights they estimate, both
    bound what vLLM held for weights and workspace."""
    room, _ = rx.model_room(rx.Config(model_a=model_folder(tmp_path / "m", shape)), "A", batch)
    held = (weights_gib + workspace_gib) * rx.GIB
    assert room.weights + room.workspace_least <= held <= room.weights + room.workspace_most
    assert room.workspace_most - room.workspace_least <= 0.32 * rx.GIB, "a bound, not a guess"


def test_a_model_with_a_vision_encoder_is_not_sized_from_its_text_model_alone(fake_gpu, tmp_path, capsys):
    """Its encoder's weights and vLLM's profiling of it are not in the text sizes: not checked, and said."""
    vision = {"text_config": SEVEN_B, "vision_config": {"hidden_size": 1280, "depth": 32}}
    args = ["--check", "--model-a", model_folder(tmp_path / "vl", vision), "--experiments", "2"]
    assert rx.main(in_process_args(tmp_path / "r", *args), nvml_module=fake_gpu) == 0
    out = capsys.readouterr().out
    assert "! models fit: not checked: model A has an encoder beside its text model (vision_config" in out


def test_a_large_vocabulary_share_that_passed_and_failed_in_vllm_is_refused(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    """A 0.5B model with a 262,144-token vocabulary at 0.06 of an H100: the check before passed it, and vLLM
    found "Available KV cache memory: -0.26 GiB" (its sampler profiles 1,024 rows of 262,144 logits)."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "81559")
    monkeypatch.setenv("FAKE_GPU_NAME", "NVIDIA H100 80GB HBM3")
    args = ["--check", "--model-a", model_folder(tmp_path / "m", LARGE_VOCABULARY), "--experiments", "2"]
    args = in_process_args(tmp_path / "r", *args)
    assert rx.main([*args, "--gpu-memory-utilization", "0.06"], nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "✗ models fit: static: model A at --gpu-memory-utilization 0.06 (4,894 MiB) cannot hold" in out
    small_batch = ["--extra-server-args", "--max-num-seqs 256 --max-num-batched-tokens 2048"]
    assert rx.main([*args, "--gpu-memory-utilization", "0.06", *small_batch], nvml_module=fake_gpu) == 0
    assert rx.main([*args, *room_fix(out, "2")], nvml_module=fake_gpu) == 0


def deepest_model(tmp_path: Path, free: int, with_rest: bool) -> tuple[str, "rx.ModelRoom"]:
    """The deepest small model whose three copies' weights (`with_rest`: and vLLM's rest beside each) and one
    request fit `free`, on a 16 GB card (256 rows sampled)."""
    deepest = None
    for layers in range(1, 200):
        shape = {**SEVEN_B, "num_hidden_layers": layers, "hidden_size": 896, "intermediate_size": 4864}
        folder = model_folder(tmp_path / str(layers), shape)
        room, _ = rx.model_room(rx.Config(model_a=folder), "A", SMALL_BATCH)
        if 3 * (room.weights + with_rest * room.rest) + room.request_kv > free:
            assert deepest, "even one layer is too deep"
            return deepest
        deepest = folder, room
    raise AssertionError("no model is too deep")


def test_kvcached_models_that_fit_without_each_servers_own_memory_are_refused(fake_gpu, tmp_path, capsys):
    """Each kvcached server holds its CUDA context and workspace beside its weights (1.5 GiB at 2,048 tokens):
    three models whose weights and one request fit the card but not with that are refused before launch."""
    headroom = int(0.05 * 16 * rx.GIB)
    model, room = deepest_model(tmp_path, (16384 - 400) * rx.MIB - headroom, False)  # the fake's baseline
    assert 3 * (room.weights + room.rest) + room.request_kv > (16384 - 400) * rx.MIB - headroom
    args = in_process_args(tmp_path / "r", "--check", "--models", ",".join([model] * 3), "--experiments", "3")
    assert rx.main(args, nvml_module=fake_gpu) == 2
    assert (
        f"{room.rest / rx.MIB:,.0f} MiB beside each (vLLM's CUDA context and workspace)"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("free_mib, refused", [(24574, True), (31742, True), (36000, False)])
def test_the_three_models_that_failed_or_hung_under_kvcached_on_an_h100_are_refused(
    fake_gpu, tmp_path, monkeypatch, capsys, free_mib, refused
):
    """Qwen2.5-0.5B, 1.5B and 7B under shared_kvcached on an H100 another process held: at 24,574 MiB free
    the 7B server ran out of memory at start-up, at 31,742 its requests waited 300 s for KV pages; both
    are refused before launch, and a card with 36,000 MiB free passes."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "81559")
    monkeypatch.setenv("FAKE_GPU_NAME", "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("FAKE_GPU_BASELINE_MIB", str(81559 - free_mib))
    shapes = {"half": HALF_B, "one_and_half": ONE_AND_HALF_B, "seven": SEVEN_B}
    models = ",".join(model_folder(tmp_path / name, shape) for name, shape in shapes.items())
    args = in_process_args(
        tmp_path / "r", "--check", "--models", models, "--experiments", "3", "--preset", "smoke"
    )
    assert rx.main(args, nvml_module=fake_gpu) == (2 if refused else 0)
    out = capsys.readouterr().out
    assert ("✗ models fit: shared_kvcached: the weights of model A, B, C" in out) == refused, out


def test_kvcached_models_must_leave_the_headroom_kvcached_keeps_unused(fake_gpu, tmp_path, capsys):
    """kvcached maps no KV page while less than (1 - KVCACHED_GPU_UTILIZATION) of the card is free: on an
    H100 with 31,742 MiB free, three models that fit beside each other but not beside those 4,078 MiB
    started, and the last one's requests waited 300 s without an answer. Refused now; at 0.99 they fit."""
    free = (16384 - 400) * rx.MIB
    model, room = deepest_model(tmp_path, free - int(0.01 * 16 * rx.GIB), True)
    assert 3 * (room.weights + room.rest) + room.request_kv > free - int(0.05 * 16 * rx.GIB), (
        "not beside the headroom"
    )
    args = in_process_args(tmp_path / "r", "--check", "--models", ",".join([model] * 3), "--experiments", "3")
    assert rx.main(args, nvml_module=fake_gpu) == 2
    assert "of which kvcached keeps 819 MiB unused (KVCACHED_GPU_UTILIZATION)" in capsys.readouterr().out
    assert rx.main([*args, "--kvcached-env", "KVCACHED_GPU_UTILIZATION=0.99"], nvml_module=fake_gpu) == 0


def test_a_kvcached_server_waiting_for_memory_says_so_while_its_requests_wait(tmp_path, capsys):
    """kvcached logs "Waiting for physical KV capacity" while it cannot map a page, and its requests get no
    answer until the request timeout (300 s on the H100): each progress line says why."""
    import concurrent.futures
    import time

    log = tmp_path / "server_C_kvcached.log"
    log.write_text("INFO Starting vLLM API server\n")
    spec = next(s for s in rx.parse_experiments("1")[0].servers(rx.Config(), 0))
    server = rx.RunningServer(spec, None, [], {}, log, 0.0)
    server.exit_code = lambda: None  # the keeper stays up
    assert rx.kv_wait_hint(server) == ""
    log.write_text(
        "(EngineCore pid=2597) [kvcached][WARNING] Waiting for physical KV capacity to reserve null block: "
        "reason=no_effective_capacity, physical_free_pages=0\n"
    )
    never = concurrent.futures.Future()
    assert rx.await_burst([never], time.time(), time.time() + 2.0, 0.1, server).startswith("still open")
    out = capsys.readouterr().out
    assert "0/1 requests done after" in out and "kvcached waits for memory to map KV pages" in out
    assert "only while 5% of the card (1 - KVCACHED_GPU_UTILIZATION) stays free" in out
    moved = rx.RunningServer(spec, None, [], {"KVCACHED_GPU_UTILIZATION": "0.9"}, log, 0.0)
    assert "only while 10% of the card" in rx.kv_wait_hint(moved), "the server's own setting"
    static = rx.RunningServer(dataclasses.replace(spec, kvcached=False), None, [], {}, log, 0.0)
    assert rx.kv_wait_hint(static) == "", "only kvcached maps pages"


def test_fixed_kv_pools_too_large_for_the_card_are_told_the_budget_that_fits(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    """overload_static holds both models' weights and its whole KV budget at once: a 7B and a 1.5B model
    with 4 GiB of KV do not fit 24 GiB beside what each server holds; the budget the fix names does."""
    monkeypatch.setenv("FAKE_GPU_TOTAL_MIB", "24576")
    one_half_b = {**SEVEN_B, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2}
    models = [model_folder(tmp_path / "7b", SEVEN_B), model_folder(tmp_path / "1.5b", one_half_b)]
    args = ["--check", "--model-a", models[0], "--model-b", models[1], "--experiments", "overload_static"]
    args = in_process_args(tmp_path / "r", *args, "--overload-budget-gib", "4")
    assert rx.main(args, nvml_module=fake_gpu) == 2
    out = capsys.readouterr().out
    assert "and their KV pools take" in out
    fix = re.search(r"fix: (--overload-budget-gib ([0-9.]+)), or a smaller model", out)
    assert fix and 0 < float(fix.group(2)) < 4, out
    assert rx.main([*args, *fix.group(1).split()], nvml_module=fake_gpu) == 0


def test_gemma_3s_kv_bytes_count_the_head_dim_its_config_leaves_out():
    # google/gemma-3-12b-it's text_config names no head_dim (Gemma3TextConfig's default 256, not 3840 / 16)
    text = dict(model_type="gemma3_text", hidden_size=3840, num_attention_heads=16, num_key_value_heads=8)
    assert rx.kv_bytes_per_token({"text_config": {**text, "num_hidden_layers": 48}}) == 2 * 48 * 8 * 256 * 2
    four_b = {"model_type": "gemma3_text", "hidden_size": 2560, "num_hidden_layers": 34}  # heads left out too
    assert rx.kv_bytes_per_token({"text_config": four_b}) == 2 * 34 * 4 * 256 * 2

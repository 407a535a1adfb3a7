"""Any model, any vLLM that kvcached supports: the installed versions checked before launch, and one
model runner for every arm (vLLM 0.24 runs Llama, Qwen3, Mistral, ... on its Model Runner V2, which
kvcached 0.1.6 refuses there). The fake server reads its vLLM release from package metadata on its
path (tests/fakes holds 0.24.0 and kvcached 0.1.6; a test puts another release in front)."""

import json
import os
from pathlib import Path
from typing import Optional

import pytest
from conftest import (
    FAKE_PACKAGES,
    FAKES,
    background,
    fake_env,
    in_process_args,
    rx,
    script_args,
    succeeded_run,
)

QWEN3_0_6B = {  # Qwen3-0.6B's own shapes
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "torch_dtype": "bfloat16",
}
LLAMA_3_2_1B = {  # Llama-3.2-1B's own shapes: the Llama architecture, small enough for the fake card
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def model_folder(base: Path, name: str, config: dict) -> Path:
    folder = base / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fake_packages(base: Path, **versions: str) -> Path:
    """A folder of package metadata (NAME-X.dist-info), to put in front of tests/fakes on the path."""
    for name, version in versions.items():
        info = base / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return base


def with_packages(base: Path, **versions: str) -> str:
    return os.pathsep.join([str(fake_packages(base / "site", **versions)), str(FAKES), str(FAKE_PACKAGES)])


# --- pure: versions and the runner rule ------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [("0.24.0", (0, 24)), ("0.30.0rc1", (0, 30)), ("0.26.0+cu130", (0, 26)), ("", None), (None, None)],
)
def test_release_reads_major_and_minor(text, expected):
    assert rx.release(text) == expected


def test_a_vllm_newer_than_kvcached_supports_fails_naming_both_and_what_to_install():
    check = rx.check_versions({"vllm": "0.33.0", "kvcached": "0.1.6"}, kvcached_needed=True)
    assert not check.ok
    assert check.detail == "kvcached 0.1.6 supports vLLM 0.17–0.30; found vllm 0.33.0"
    assert "pip install vllm==0.30.0" in check.fix


def test_versions_kvcached_supports_pass_and_unknown_ones_warn():
    assert rx.check_versions({"vllm": "0.24.0", "kvcached": "0.1.6"}, True).line().startswith("  ✓ versions")
    older = rx.check_versions({"vllm": "0.16.1", "kvcached": "0.1.6"}, True)
    assert not older.ok and "found vllm 0.16.1" in older.detail
    without_kvcached = rx.check_versions({"vllm": "0.33.0", "kvcached": "0.1.6"}, False)
    assert without_kvcached.ok and without_kvcached.warning and "0.24–0.30" in without_kvcached.detail
    unknown = rx.check_versions({"vllm": "0.24.0", "kvcached": "0.2.0"}, True)
    assert unknown.ok and unknown.warning and "kvcached 0.2.0" in unknown.detail
    assert rx.check_versions({}, True).warning
    for suffixed in ("0.1.6.post1", "0.1.6+cu129"):  # kvcached 0.1.6 all the same: it was only warned of
        assert not rx.check_versions({"vllm": "0.33.0", "kvcached": suffixed}, True).ok


@pytest.mark.parametrize(
    "vllm, kvcached_needed, shell, expected",
    [
        ("0.24.0", True, {}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
        ("0.27.1", True, {}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
        ("0.28.0", True, {}, {}),  # kvcached supports V2 from here: vLLM's default
        ("0.30.0", True, {}, {}),
        ("0.24.0", False, {}, {}),  # no kvcached arm: vLLM's default for every arm
        (None, True, {}, {}),
        ("0.24.0", True, {"VLLM_USE_V2_MODEL_RUNNER": "1"}, {"VLLM_USE_V2_MODEL_RUNNER": "1"}),
        ("0.30.0", False, {"VLLM_USE_V2_MODEL_RUNNER": "0"}, {"VLLM_USE_V2_MODEL_RUNNER": "0"}),
    ],
)
def test_one_model_runner_for_every_arm(vllm, kvcached_needed, shell, expected):
    assert rx.model_runner_env(vllm, kvcached_needed, shell) == expected


@pytest.mark.parametrize(
    "vllm, shell, ok, detail",
    [
        (
            "0.24.0",
            {},
            True,
            "VLLM_USE_V2_MODEL_RUNNER=0 for every server (kvcached 0.1.6 needs V1 on vllm 0.24.0)",
        ),
        ("0.30.0", {}, True, "vLLM's default for every server"),
        (
            "0.28.0",
            {"VLLM_USE_V2_MODEL_RUNNER": "1"},
            True,
            "VLLM_USE_V2_MODEL_RUNNER=1 for every server (from the shell)",
        ),
        (
            "0.24.0",
            {"VLLM_USE_V2_MODEL_RUNNER": "1"},
            False,
            "runs on Model Runner V2 only from vLLM 0.28, found vllm 0.24.0",
        ),
        (
            "0.29.0",
            {"VLLM_USE_V2_MODEL_RUNNER": "0"},
            False,
            "requires Model Runner V2 from vLLM 0.29, found vllm 0.29.0",
        ),
    ],
)
def test_a_runner_kvcached_refuses_fails_before_launch(vllm, shell, ok, detail):
    check = rx.check_model_runner({"vllm": vllm, "kvcached": "0.1.6"}, True, shell)
    assert check.ok is ok and detail in check.detail
    assert ok or "unset VLLM_USE_V2_MODEL_RUNNER" in check.fix


def test_a_server_that_kvcached_stopped_on_v2_says_what_to_do(tmp_path):
    log = tmp_path / "server_A_kvcached.log"
    log.write_text(
        "INFO Using V2 Model Runner\nkvcached.utils.KVCachedConfigError: kvcached does not support the vLLM "
        "0.24.0 Model Runner V2 yet; set VLLM_USE_V2_MODEL_RUNNER=0 to use the V1 model runner\n"
    )
    spec = next(s for s in rx.parse_experiments("1")[0].servers(rx.Config(), 0))
    server = rx.RunningServer(spec, None, [], {"VLLM_USE_V2_MODEL_RUNNER": "1"}, log, 0.0)
    hint = rx.runner_hint(server)
    assert "kvcached refused vLLM's model runner (VLLM_USE_V2_MODEL_RUNNER=1)" in hint
    assert "unset VLLM_USE_V2_MODEL_RUNNER" in hint
    assert "Where the shell sets none, the servers' vLLM is not the one --check read" in hint
    # vLLM's version unknown (--server-cmd): the harness set nothing, so there is nothing to unset
    vllm_chose = rx.RunningServer(spec, None, [], {}, log, 0.0)
    assert "(VLLM_USE_V2_MODEL_RUNNER unset): set it in the shell" in rx.runner_hint(vllm_chose)
    log.write_text("INFO Using V2 Model Runner\nINFO Starting vLLM API server\n")
    assert rx.runner_hint(server) == "", "a V2 server that did not die of it gets no hint"


def test_runner_env_reaches_both_arms_and_the_shell_cannot_flip_one(monkeypatch):
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    cfg = rx.Config()
    runner = rx.model_runner_env("0.24.0", True, {})
    for arm in ("kvcached", "static"):
        spec = next(s for e in rx.parse_experiments("1,2") if e.arm == arm for s in e.servers(cfg, 0))
        assert rx.server_env(cfg, spec, base={}, run_env=runner)["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_the_runner_is_read_from_the_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO Loading weights took 0.93 GiB\n(EngineCore pid=7) INFO Using V2 Model Runner\n")
    assert rx.runner_from_log(log) == "V2"
    log.write_text("INFO Loading weights took 0.93 GiB\n")
    assert rx.runner_from_log(log) == "V1"
    assert rx.runner_from_log(tmp_path / "missing.log") is None


def test_summary_says_the_runner_and_warns_when_arms_differ():
    same = {"servers": {"A kvcached": {"model_runner": "V1"}, "A static 0.55": {"model_runner": "V1"}}}
    assert rx.model_runner_lines({**same, "model_runner_env": {"VLLM_USE_V2_MODEL_RUNNER": "0"}}) == [
        "",
        "vLLM's model runner: V1 for every server "
        "(VLLM_USE_V2_MODEL_RUNNER=0 in every server's environment).",
    ]
    differ = {"servers": {"A kvcached": {"model_runner": "V1"}, "A static 0.55": {"model_runner": "V2"}}}
    (line,) = rx.model_runner_lines(differ)[1:]
    assert "different vLLM model runners** (V1 for A kvcached; V2 for A static 0.55)" in line
    assert rx.model_runner_lines({"servers": {"A kvcached": {"startup_s": 1}}}) == []  # runs before this


# --- before launch: an unsupported vLLM is refused -------------------------------------------------
def test_an_unsupported_vllm_fails_check_and_the_run_exits_2_before_any_server(
    fake_gpu, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PYTHONPATH", with_packages(tmp_path, vllm="0.33.0", kvcached="0.1.6"))
    args = in_process_args(tmp_path / "r", "--experiments", "1,2")
    assert rx.main(["--check", *args], nvml_module=fake_gpu) == 2, "a failed check: bad input, as the run's"
    out = capsys.readouterr().out
    assert "✗ versions: kvcached 0.1.6 supports vLLM 0.17–0.30; found vllm 0.33.0" in out
    assert rx.main(args, nvml_module=fake_gpu) == 2
    err = capsys.readouterr().err
    assert "preflight failed, nothing was started" in err and "found vllm 0.33.0" in err
    assert not (tmp_path / "r").exists(), "no run folder"
    assert not list(Path(os.environ["FAKE_GPU_DIR"]).glob("*.json")), "no server started"


# --- whole runs against the fakes ------------------------------------------------------------------
def versions_run(
    base: Path, model: dict, *extra: str, packages: str = "", env_extra: Optional[dict] = None
) -> dict:
    (base / "gpu").mkdir()
    folder = model_folder(base, "model", model)
    env = fake_env(base / "gpu")
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)  # a developer's shell must not decide these runs
    env.update(env_extra or {}, **({"PYTHONPATH": packages} if packages else {}))
    args = script_args(base / "results", "--experiments", "1,2", "--model-a", str(folder), *extra)
    return dict(args=args, env=env, timeout=180)


@background("qwen3_and_llama_run", weight=6)
def qwen3_and_llama_run_cmd(base):
    """Qwen3 as model A and Llama as model B, each under both arms (the shared kvcached and static pairs)."""
    llama = model_folder(base, "llama", LLAMA_3_2_1B)
    return versions_run(base, QWEN3_0_6B, "--experiments", "3,4", "--model-b", str(llama), "--bursts", "1")


@background("qwen3_on_vllm_0_30", weight=3)
def qwen3_on_vllm_0_30_cmd(base):
    return versions_run(
        base, QWEN3_0_6B, "--bursts", "1", packages=with_packages(base, vllm="0.30.0", kvcached="0.1.6")
    )


@pytest.fixture
def qwen3_and_llama_run(background_runs):
    return succeeded_run(background_runs, "qwen3_and_llama_run")


@pytest.fixture
def qwen3_on_vllm_0_30(background_runs):
    return succeeded_run(background_runs, "qwen3_on_vllm_0_30")


def server_logs(run_dir: Path) -> dict[str, str]:
    return {log.name: log.read_text() for log in run_dir.glob("*/server_*.log")}


def test_qwen3_and_llama_run_both_arms_on_v1_with_vllm_0_24(qwen3_and_llama_run):
    """Models vLLM 0.24 would run on V2 ran both arms on V1 (kvcached dies on V2 there), and said so."""
    run_dir = qwen3_and_llama_run
    logs = server_logs(run_dir)
    assert len(logs) == 4, logs.keys()
    config = json.loads((run_dir / "config.json").read_text())
    architectures = {s["spec"]["model"].rsplit("/", 1)[-1] for s in config["servers"].values()}
    assert architectures == {"model", "llama"}, config["servers"]
    for log in logs.values():
        assert log.splitlines()[0].startswith("$ ") and "VLLM_USE_V2_MODEL_RUNNER=0 " in log.splitlines()[0]
        assert "Using V2 Model Runner" not in log
    assert config["server_versions"] == {"vllm": "0.24.0", "kvcached": "0.1.6"}
    assert config["model_runner_env"] == {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    assert {s["model_runner"] for s in config["servers"].values()} == {"V1"}
    summary = (run_dir / "summary.md").read_text()
    assert (
        "vLLM's model runner: V1 for every server (VLLM_USE_V2_MODEL_RUNNER=0 in every server's environment)."
        in summary
    )
    assert "Plots: none drawn (--no-plots" in summary and not list(run_dir.glob("plots/*.png")), "--no-plots"


def test_from_vllm_0_28_every_arm_keeps_vllms_default_runner(qwen3_on_vllm_0_30):
    config = json.loads((qwen3_on_vllm_0_30 / "config.json").read_text())
    assert config["model_runner_env"] == {}
    assert {s["model_runner"] for s in config["servers"].values()} == {"V2"}
    for log in server_logs(qwen3_on_vllm_0_30).values():
        assert "VLLM_USE_V2_MODEL_RUNNER" not in log.splitlines()[0]


def test_a_server_command_that_is_a_script_has_its_versions_read_from_the_python_it_names(tmp_path):
    # `--server-cmd "/venv/bin/vllm serve"`: versions were read from the harness's Python (vLLM 0.24), and
    # the runner forced for it killed the venv's vLLM 0.29 at engine start
    script = tmp_path / "vllm"
    script.write_text("#!/venv/bin/python3.12\nfrom vllm.entrypoints.cli.main import main\n")
    env_script = tmp_path / "tool"
    env_script.write_text("#!/usr/bin/env python3\n")
    assert rx.servers_python(str(script)) == "/venv/bin/python3.12"
    assert rx.servers_python(str(env_script)) == "python3"
    assert rx.servers_python("/usr/bin/python3") == "/usr/bin/python3"
    assert rx.servers_python(str(tmp_path / "none")) == rx.sys.executable, "nothing to read: ours"

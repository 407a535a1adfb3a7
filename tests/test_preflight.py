"""--check: each line of the preflight checklist, its failure path with fakes, and that a failing
preflight starts nothing."""

import dataclasses
import json
import os
import socket
import sys
import types
from pathlib import Path

import pytest
from conftest import FAKE_SERVER, STATIC_A, free_port, in_process_args, make_cfg, ready, rx


def test_python_versions():
    assert not rx.check_python((3, 9)).ok
    newer = rx.check_python((3, 14))
    assert newer.ok and newer.warning
    assert rx.check_python((3, 12)).ok and not rx.check_python((3, 12)).warning


@pytest.mark.parametrize(
    "driver_cuda, torch_cuda, ok, warning",
    [
        (13000, "13.0", True, False),
        (13000, "12.8", True, False),
        (12080, "13.0", False, False),  # the PyPI vLLM 0.24 / torch 2.11 pair on a CUDA 12 driver
        (13000, "13.1", True, True),  # minor-version compatibility
    ],
)
def test_driver_against_torch_cuda(fake_gpu, monkeypatch, driver_cuda, torch_cuda, ok, warning):
    nvml = rx.load_nvml(fake_gpu)
    monkeypatch.setattr(fake_gpu, "nvmlSystemGetCudaDriverVersion", lambda: driver_cuda)
    check = rx.check_driver(nvml, torch_cuda)
    assert (check.ok, check.warning) == (ok, warning)
    if not ok:
        assert "R580" in check.fix and "CUDA 12.8" in check.detail


def test_torch_cuda_version_is_read_without_importing_torch(tmp_path, monkeypatch):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise RuntimeError('imported')")
    (tmp_path / "torch" / "version.py").write_text("__version__ = '2.11.0'\ncuda: Optional[str] = '13.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("torch", None)
    assert rx.torch_cuda_version() == "13.0"


def test_a_busy_card_fails_the_static_share_and_names_the_holders(fake_gpu, monkeypatch):
    monkeypatch.setenv("FAKE_GPU_BASELINE_MIB", "9000")  # of 16384
    nvml = rx.load_nvml(fake_gpu)
    busy = rx.check_card(nvml, 0, (0.55, 1))
    assert (
        not busy.ok
        and "less than the 0.55 of the card the static pools of one experiment hold" in busy.detail
    )
    assert rx.check_card(nvml, 0, (0.3, 1)).ok


def test_static_pools_that_leave_no_room_for_each_servers_context_are_warned_of(fake_gpu):
    # 16,384 MiB, 400 in use: the shares fit, 419 MiB beside them, but each server started before the last
    # also holds its CUDA context outside its share, and vLLM refuses a share the free memory cannot give
    nvml = rx.load_nvml(fake_gpu)
    tight = rx.check_card(nvml, 0, (0.95, 3))
    assert (
        tight.ok
        and tight.warning
        and "419 MiB beside the 0.95 of the card that 3 static pools" in tight.detail
    )
    assert "--static-shares" in tight.fix
    assert not rx.check_card(nvml, 0, (0.95, 1)).warning, "one pool: nothing starts before it"
    assert not rx.check_card(nvml, 0, (0.9, 2)).warning, "819 MiB beside: room for one context"
    stranger = Path(os.environ["FAKE_GPU_DIR"]) / f"{os.getpid()}.json"  # another job's process on the card
    stranger.write_text(json.dumps({"used_bytes": 100 * rx.MIB}))
    crowded = rx.check_card(nvml, 0, (0.95, 3))
    assert crowded.warning and crowded.detail.endswith(f"; other processes on it: pid {os.getpid()} 100 MiB")


def test_the_sleep_arms_servers_awake_at_once_count_against_the_card(fake_gpu):
    # 4 models at 0.3: the router keeps 3 awake (0.9 of the card) beside the fourth asleep, where the check
    # counted one awake: on a 16,384 MiB card they overflowed it by 474 MiB, and nothing said so
    asleep = types.SimpleNamespace(kvcached=False, kv_cache_memory_bytes=None, sleep_mode=True)
    four = [types.SimpleNamespace(**vars(asleep), gpu_memory_utilization=0.3) for _ in range(4)]
    awake = rx.awake_at_most(rx.Config(gpu_memory_utilization=0.3))
    share, servers = rx.static_held_at_once(four, awake)
    assert (awake, servers) == (3, 4) and share == pytest.approx(0.9)
    tight = rx.check_card(rx.load_nvml(fake_gpu), 0, (share, servers))
    assert tight.warning and tight.detail.endswith("the last may not start (or, asleep, wake)")


def test_an_import_failing_on_the_cuda_runtime_says_torch_and_vllm_disagree():
    check, _ = rx.import_check(
        "vllm",
        "raise ImportError('libcudart.so.13: cannot open shared object file')",
        dict(os.environ),
        30,
        "pip install vllm",
    )
    assert not check.ok and "libcudart.so.13" in check.detail and "different CUDA versions" in check.fix


def fake_vllm(tmp_path, patched: bool) -> dict:
    """A `vllm` package with a `_C`, and (if patched) a kvcached hook that imports with it."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "_C_stable_libtorch.abi3.so").write_text("")  # what the probe looks for...
    (tmp_path / "standin").mkdir()
    (tmp_path / "standin" / "_C_stable_libtorch.py").write_text("")  # ...and what it then imports
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    hook = "import kvcached.integration.vllm.autopatch\n" if patched else ""
    (tmp_path / "vllm" / "__init__.py").write_text(
        f"__path__.insert(0, {str(tmp_path / 'standin')!r})\n" + hook
    )
    for pkg in ("kvcached", "kvcached/integration", "kvcached/integration/vllm"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "kvcached/integration/vllm/autopatch.py").write_text("")
    (tmp_path / "vllm-0.24.0.dist-info").mkdir()
    (tmp_path / "vllm-0.24.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\nVersion: 0.24.0\n"
    )
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize("patched", [True, False])
def test_kvcached_autopatch_must_hook_into_vllm(tmp_path, monkeypatch, patched):
    for key, value in fake_vllm(tmp_path, patched).items():
        monkeypatch.setenv(key, value)
    cfg = rx.resolve_config(rx.Config(preset="smoke"))
    vllm, *kvcached = rx.check_serving_imports(cfg, kvcached_needed=True, timeout_s=60)
    assert vllm.ok and "vllm 0.24.0 importable (compiled: _C_stable_libtorch)" in vllm.detail
    assert kvcached[0].ok == patched
    if not patched:
        assert "--no-build-isolation" in kvcached[0].fix


def test_models_local_folder_or_hub(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(
        rx, "hub_config", lambda model, timeout_s=10.0: (None, "GatedRepoError: 401 Unauthorized")
    )
    cfg = rx.resolve_config(
        rx.Config(preset="smoke", model_a=str(tmp_path), model_b="meta-llama/Llama-3.1-8B")
    )
    local, gated = (rx.check_model(cfg, slot) for slot in "AB")
    assert local.ok and not gated.ok
    assert "GatedRepoError" in gated.detail and "HF_TOKEN" in gated.fix


def test_a_base_model_without_a_chat_template_is_refused_before_launch(tmp_path):
    # vLLM answers every chat completion 400 for a tokenizer with no chat template; the run would learn
    # that only after start-up, from every request of every burst
    base, instruct, jinja = (tmp_path / name for name in ("base", "instruct", "jinja"))
    for folder, tokenizer in ((base, {}), (instruct, {"chat_template": "{{ messages }}"}), (jinja, {})):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (jinja / "chat_template.jinja").write_text("{{ messages }}")
    cfg = rx.resolve_config(rx.Config(preset="smoke", models=f"{base},{instruct},{jinja}"))
    refused, *served = (rx.check_model(cfg, slot) for slot in "ABC")
    assert not refused.ok and "no chat template" in refused.detail and "--chat-template" in refused.fix
    assert all(check.ok for check in served)
    told = rx.resolve_config(dataclasses.replace(cfg, extra_server_args="--chat-template /tmp/chatml.jinja"))
    assert rx.check_model(told, "A").ok, "a template the server is given"
    # the servers' --tokenizer is the one whose template counts: a base model with an instruct tokenizer
    # was refused, and a chat model with a tokenizer lacking one passed
    assert rx.check_model(dataclasses.replace(cfg, tokenizer=str(instruct)), "A").ok
    chat = dataclasses.replace(cfg, tokenizer=str(base))
    assert not rx.check_model(chat, "B").ok and rx.check_model(chat, "B").detail.startswith(f"{base}: its")
    (base / "tokenizer_config.json").unlink()
    assert rx.check_model(cfg, "A").ok, "no tokenizer beside the model: not known here"


@pytest.mark.parametrize(
    "missing, known", [("RemoteEntryNotFoundError: 404", False), ("LocalEntryNotFoundError: offline", None)]
)
def test_a_hub_models_chat_template_is_known_missing_only_where_the_hub_says_so(
    tmp_path, monkeypatch, missing, known
):
    (tmp_path / "tokenizer_config.json").write_text("{}")

    def hub_file(model, name, timeout_s=10.0):
        return (str(tmp_path / name), "") if name == "tokenizer_config.json" else (None, missing)

    monkeypatch.setattr(rx, "hub_file", hub_file)
    assert rx.has_chat_template("meta-llama/Llama-3.1-8B") is known


def test_a_port_in_use_is_a_failed_check():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        cfg = make_cfg(port_a=sock.getsockname()[1])
        taken, free = rx.check_ports(cfg, "AB")
    assert not taken.ok and "--port-a" in taken.fix and free.ok


def test_a_host_that_is_not_this_machines_is_one_failed_check_naming_host_not_each_port():
    (host,) = rx.check_ports(make_cfg(host="192.0.2.1"), "AB")  # TEST-NET-1: no interface has it
    assert (host.name, host.ok) == ("host", False) and "--host 192.0.2.1: not an address" in host.detail
    assert "--host 127.0.0.1" in host.fix and "--port" not in host.fix
    assert [c.ok for c in rx.check_ports(make_cfg(host="0.0.0.0"), "A")] == [True]


def test_a_third_models_port_in_use_names_the_flag_that_moves_it():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        cfg = make_cfg(models="m1,m2,m3", port_a=port - 5, port_b=port - 1)
        (taken,) = rx.check_ports(cfg, "C")
        assert rx.port_of(cfg, "C") == port and not taken.ok
        assert taken.fix.endswith("pick another with --port"), taken.fix
        moved = make_cfg(port=port)
        (first,) = rx.check_ports(moved, "A")
        assert not first.ok and first.fix.endswith("with --port"), "--port-a does not apply with --port"


def test_check_prints_the_checklist_and_exits_0_or_1(fake_gpu, tmp_path, monkeypatch, capsys):
    args = in_process_args(tmp_path / "r", "--check")
    assert rx.main(args, nvml_module=fake_gpu) == 0
    out = capsys.readouterr().out
    assert "✓ nvml: GPU 0: Tesla T4 (fake)" in out and "✓ port A" in out
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")
    assert rx.main(args, nvml_module=fake_gpu) == 2
    assert "✗ nvml: cannot read the GPU through NVML" in capsys.readouterr().out
    assert not (tmp_path / "r").exists(), "--check starts nothing and writes no run"


def test_a_failed_preflight_starts_nothing(fake_gpu, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_GPU_BASELINE_MIB", "12000")  # the static arm could not start
    rc = rx.main(
        [
            "--experiments",
            "2",
            "--server-cmd",
            f"{sys.executable} {FAKE_SERVER}",
            "--results-dir",
            str(tmp_path / "r"),
            "--port-a",
            str(free_port()),
            "--port-b",
            str(free_port()),
        ],
        nvml_module=fake_gpu,
    )
    err = capsys.readouterr().err
    assert rc == 2 and "preflight failed, nothing was started" in err and "✗ card" in err
    assert not (tmp_path / "r").exists()


def test_a_busy_card_fails_only_where_the_static_pools_held_at_once_do_not_fit(fake_gpu, monkeypatch):
    monkeypatch.setenv("FAKE_GPU_BASELINE_MIB", "4000")  # of 16384: room for 0.55, not for 0.55 + 0.35

    def card(experiments: str) -> rx.Check:
        cfg = rx.resolve_config(rx.validate_config(rx.Config(experiments=experiments)))
        checks, _ = rx.card_checks(cfg, rx.parse_experiments(experiments), fake_gpu)
        return next(c for c in checks if c.name == "card")

    assert card("static,shared_sleep").ok, "one sleep-mode server is awake at a time"
    shared = card("shared_static")
    assert not shared.ok and "less than the 0.9 of the card the static pools" in shared.detail


def test_a_static_pair_given_by_its_two_flags_must_fit_the_card_too():
    flags = dict(gpu_memory_utilization=0.7, pair_utilization_b=0.35)
    with pytest.raises(rx.ConfigError, match="--pair-utilization-b: .* the pair takes 1.05 of the card"):
        rx.validate_config(rx.Config(experiments="4", **flags))
    assert rx.validate_config(rx.Config(experiments="1,2", **flags)), "no static pair in the run"


def test_a_server_short_of_free_memory_at_its_start_is_told_so(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_GPU_BASELINE_MIB", "12000")  # of 16384: less than half the card is free
    cfg = make_cfg()
    server = rx.start_server(cfg, STATIC_A(cfg), tmp_path / "server.log")
    try:
        with pytest.raises(rx.ServerError, match="vLLM found too little free memory: something else holds"):
            ready(server)
    finally:
        rx.stop_servers([server], "end of test")


def test_a_model_folder_without_config_json_says_so_not_that_the_hub_is_missing(tmp_path):
    check = rx.check_model(rx.Config(model_a=str(tmp_path)), "A")
    assert not check.ok and check.detail == f"{tmp_path}: a folder without config.json"
    assert check.fix.startswith("--model-a: the folder")


def test_model_bs_kv_per_token_is_told_only_where_an_experiment_serves_model_b(fake_gpu, tmp_path, capsys):
    for experiments, told in (("1,2", False), ("1,3", True)):
        args = in_process_args(
            tmp_path / experiments, "--check", "--preset", "smoke", "--experiments", experiments
        )
        assert rx.main(args, nvml_module=fake_gpu) == 0
        assert ("model B needs" in capsys.readouterr().out) == told, experiments


def test_a_misspelt_load_format_is_said_before_anything_launches():
    (check,) = rx.check_load_format("dumy")
    assert check.ok and check.warning and "--load-format 'dumy' is none of vLLM's own" in check.detail
    assert "--load-format" in check.fix
    assert (
        rx.check_load_format("dummy") == rx.check_load_format("Safetensors") == rx.check_load_format("") == []
    )


def test_checks_left_undone_say_why_and_what_would_do_them():
    nvml = types.SimpleNamespace(
        nvmlSystemGetCudaDriverVersion=lambda: 12040, nvmlSystemGetDriverVersion=lambda: "550.1"
    )
    driver = rx.check_driver(nvml, None)
    assert (
        driver.warning
        and "torch is not installed in this Python" in driver.detail
        and "?" not in driver.detail
    )
    assert "run --check with that one" in driver.fix
    cfg = rx.Config(server_cmd="python3 -m my_engine", model_a="org/some-model")
    model = rx.check_model(cfg, "A")
    assert model.warning and "org/some-model: not looked up" in model.detail and "local folder" in model.fix

"""What an idle server's memory is made of: vLLM's own log lines, read back; a missing line is n/a."""

import types

import pytest
from conftest import rx

ENGINE = "(EngineCore pid=9) INFO "
SLEEP = (
    ENGINE + "[cumem.py:207] CuMemAllocator: sleep freed 74.57 GiB memory in total, of which 0.93 GiB is "
    "backed up in CPU and the rest 73.64 GiB is discarded directly.\n"
)
LOG = (
    ENGINE
    + "[gpu_model_runner.py:5255] Model loading took 0.93 GiB memory and 0.4 seconds\n"
    + ENGINE
    + "[gpu_worker.py:508] Available KV cache memory: 73.58 GiB\n"
    + SLEEP
    + ENGINE
    + "[gpu_worker.py:182] Sleep mode freed 89.81 GiB memory, 1.50 GiB memory is still in use.\n"
    + SLEEP
    + ENGINE
    + "[gpu_worker.py:182] Sleep mode freed 76.60 GiB memory, 1.50 GiB memory is still in use.\n"
)


def test_vllms_lines_are_read_back():
    figures = rx.log_figures(LOG)
    assert figures["weights_gib"] == [0.93] and figures["kv_pool_gib"] == [73.58]
    assert figures["sleep_pool_freed_gib"] == [74.57, 74.57] and figures["sleep_freed_gib"] == [89.81, 76.6]
    fixed = "INFO Initial free memory 78.66 GiB, reserved 2.0 GiB memory for KV Cache as specified by ..."
    assert rx.log_figures(fixed)["kv_pool_gib"] == [2.0]


def static_server() -> dict:
    return {"spec": {"kvcached": False}, "label": "A static 0.55"}


def test_a_static_servers_footprint_adds_up_to_what_nvml_shows():
    memory = rx.MemorySummary.void()
    memory.idle_before_workload_mib = 80000.0
    f = rx.footprint(static_server(), memory, rx.log_figures(LOG), [], rx.Marks())
    assert f.weights_mib == pytest.approx(0.93 * 1024) and f.kv_mib == pytest.approx(73.58 * 1024)
    assert f.rest_mib == pytest.approx(80000 - 74.51 * 1024)


def test_a_missing_line_is_na_never_0():
    memory = rx.MemorySummary.void()
    memory.idle_before_workload_mib = 80000.0
    f = rx.footprint(static_server(), memory, rx.log_figures("no such lines"), [], rx.Marks())
    assert (f.total_mib, f.weights_mib, f.kv_mib, f.rest_mib) == (80000.0, None, None, None)
    assert rx.sleep_split(rx.log_figures(""), 900.0, None, True) is None


def test_kvcached_kv_is_its_segment_over_the_idle_window():
    marks = rx.Marks(idle_after_load=(10.0, 11.0))
    rows = [
        {"t": 10.5, "used_bytes": 96 * rx.MIB, "prealloc_bytes": 480 * rx.MIB},
        {"t": 20.0, "used_bytes": 4000 * rx.MIB, "prealloc_bytes": 480 * rx.MIB},  # a burst: not idle
    ]
    memory = rx.MemorySummary.void()
    memory.idle_before_workload_mib = 5324.0
    f = rx.footprint({"spec": {"kvcached": True}}, memory, rx.log_figures(LOG), rows, marks)
    assert f.kv_mib == 576 and f.rest_mib == pytest.approx(5324 - 576 - 0.93 * 1024)


def test_the_sleep_split_is_pool_and_beyond():
    split = rx.sleep_split(rx.log_figures(LOG), 1578.0, None, False)
    assert split.sleeps == 2 and split.pool_freed_mib == pytest.approx(74.57 * 1024)
    assert split.beyond_pool_mib.max == pytest.approx((89.81 - 74.57) * 1024)
    assert split.after_load_mib is None


def test_a_fresh_servers_first_sleep_right_after_load_is_apart_from_the_bursts():
    split = rx.sleep_split(rx.log_figures(LOG), 1578.0, True, True)
    assert split.after_load_mib == pytest.approx((89.81 - 74.57) * 1024)
    assert split.beyond_pool_mib.n == 1 and split.beyond_pool_mib.max == pytest.approx((76.60 - 74.57) * 1024)
    server = types.SimpleNamespace(label="A static + sleep mode", reused=False)
    line = rx.sleep_split_line("sleep", server, split, kept=False)
    assert "each after a burst also freed 2,079 MiB on average" in line
    assert "(the sleep right after load: 15,606 MiB outside the pool)" in line
    assert split.asleep_mib == 1578.0

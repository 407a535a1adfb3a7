# %% [markdown]
# # What does elastic KV-cache memory (kvcached) buy over vLLM's static pool, and over sleep mode?
#
# vLLM reserves its whole KV-cache pool at start-up (`--gpu-memory-utilization`), so an idle
# server holds most of the card. kvcached maps KV pages on demand and gives them back when a
# burst ends. vLLM's sleep mode frees the card too, but someone must put the server to sleep and
# wake it before traffic. This script measures, on *your* GPU with *your* models:
#
# 1. `kvcached`          one model, kvcached's elastic pool: idle VRAM, peak, release time, latency;
# 2. `static`            the same model and workload with vLLM's static pool;
# 3. `shared_kvcached`   models A and B on one GPU, both elastic, alternating bursts;
# 4. `shared_static`     the same pair split statically (`--gpu-memory-utilization` per model);
# 5. `overload_kvcached` / `overload_static`: one model bursts past its static share while the
#    other idles, then they swap, both pairs under the same stated KV budget;
# 6. `sleep`             the static pool with sleep mode: asleep between bursts, woken by the next;
# 7. `shared_sleep`      two models time-sharing the card that way.
#
# Experiments 3-7 take every model sharing the card: A and B by default, or as many as `--models`
# names (slots A, B, C, ...; static shares from `--static-shares`, one overload budget split N ways).
#
# Closed bursts by default; `--arrivals poisson --rates ...` sends open-loop traffic instead.
# `--gpus 0,1` spreads the experiments over several cards of one host; on a machine with cores to
# spare, each next server imports vLLM while the experiment before it runs, and the first ones while
# the preflight checks that vLLM imports (`--preimport`); vLLM's engine process is forked from its API
# server rather than importing vLLM again (`--engine-start`).
#
# Memory comes from NVML (device total and per server process tree), kvcached's own shared-memory
# segment, and vLLM's `/metrics`; latency from streamed chat completions (TTFT, per-token, E2E).
# The harness never imports torch or vLLM: a CUDA context here would skew what it measures.
#
# Run it three ways:
# * GPU box:  `python run_experiments.py` (see `--help`; `--preset smoke` for a quick look);
# * Colab:    paste this whole file into one cell, edit `NOTEBOOK_ARGS` below, run the cell;
# * offline:  `python run_experiments.py --report results/<run>` rebuilds summaries and plots.
#
# Results go to a fresh `results/<UTC timestamp>_<tag>/`, never overwritten.
#
# How this file reads: the story first (configuration, the table of experiments, what one
# experiment does, main), then an appendix of machinery, one cell per concern. Nothing runs before
# the last cell, so the story may call what the appendix defines.

# %% Imports and runtime detection (no side effects)
from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime as _dt
import errno
import fcntl
import functools
import gzip
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import zlib
from pathlib import Path
from typing import Any, AnyStr, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np


def running_in_notebook() -> bool:
    """True inside Jupyter/Colab, where sys.argv belongs to the kernel, not to us."""
    return "ipykernel" in sys.modules or "google.colab" in sys.modules


# %% Run state: one owner for the stop flags, the secrets and where messages go
class RunState:
    """What a run holds beyond its config: how far a stop has gone, the secret values to scrub, and
    where messages go. main() starts a fresh one."""

    def __init__(self, out: Callable[[str], None] = print):
        self.out = out
        self.hurry = threading.Event()  # a second Ctrl-C/SIGTERM during a stop: SIGKILL now
        self.stopping = threading.Event()  # a stop is under way: signal handlers must not interrupt it
        self.interrupt_pending = threading.Event()  # a signal came during a stop: end the run after it
        self.signals_seen = 0
        self.secrets: set[str] = set()  # values scrubbed from anything written or printed

    def say(self, message: Any) -> None:
        try:
            self.out(scrub(str(message)))
            if self.out is print:  # through a pipe (`| tee`) each line shows at once, not in 8 KB blocks
                sys.stdout.flush()
        except OSError:  # a closed terminal or pipe (SIGHUP, `| tee` gone): the run still stops its servers
            quiet_stdout()


STATE = RunState()


def say(message: Any) -> None:
    """Print one progress message of the current run."""
    STATE.say(message)


# %% Helper programs: functions of this file that run in a fresh Python
# Each server's keeper, the device sampler, a server imported ahead, vLLM's probe and the --server-cmd
# import check run in a fresh Python. They are written as functions here, so the linter and the tests
# see them, and shipped as their own source (inspect reads it from this file, or in a notebook from the
# cell IPython keeps; the preflight checks that it can). Each is self-contained: it imports what it
# needs inside, and names only the functions shipped with it.
def program_source(*functions: Callable, call: str) -> str:
    """`python -c` text that defines `functions` and then runs `call`."""
    bodies = [function_source(function) for function in functions]
    return "\n\n".join(["from __future__ import annotations", *bodies, call]) + "\n"


@functools.lru_cache(maxsize=None)  # read once: the file edited mid-run must not change a later keeper
def function_source(function: Callable) -> str:
    import inspect
    import textwrap

    return textwrap.dedent(inspect.getsource(function))


# %% Configuration: every knob, one line each, with its unit and reason
# In Colab, edit this string instead of passing command-line flags (the kernel's argv is ignored).
NOTEBOOK_ARGS = "--preset auto"

MIB = 1024**2
GIB = 1024**3
PRESETS = ("auto", "seed", "smoke")


@dataclasses.dataclass(frozen=True)
class Config:
    # --- what to run
    experiments: str = "all"  # comma list of names or numbers (see the table), 'seed' = 1,2,3, 'all'
    preset: str = "auto"  # auto: bursts sized to the card; seed: the tutorial's; smoke: tiny
    tag: str = "run"  # suffix of the results folder name
    results_dir: str = "results"  # parent of every run folder
    repeats: int = 1  # measured workload repetitions per experiment (same servers, same plan)
    # --- models and servers
    model_a: str = "Qwen/Qwen2.5-0.5B-Instruct"  # HF id or local folder
    model_b: str = "Qwen/Qwen2.5-1.5B-Instruct"  # second model for the shared/overload experiments
    models: str = ""  # N models sharing the card, comma list: slots A, B, C, ... ('' = --model-a,--model-b)
    tokenizer: str = ""  # passed to vLLM as --tokenizer when set
    load_format: str = ""  # 'dummy' = random weights with the real shapes (no download)
    max_model_len: int = 2048  # tokens; bounds prompt + output ('auto' with a trace: its longest request)
    host: str = "127.0.0.1"  # vLLM binds every interface unless told otherwise
    port_a: int = 8001  # model A's server (one port per slot, so A can be reused across experiments)
    port_b: int = 8002  # model B's server
    port: int = 0  # first port: slot i listens on port + i (0 = --port-a/--port-b, then --port-b + 1, ...)
    api_key: str = ""  # passed to vLLM and sent by the client when set
    server_cmd: str = ""  # replaces 'python -m vllm.entrypoints.openai.api_server'
    extra_server_args: str = ""  # appended to every server command; not the flags the harness sets itself
    gpu_memory_utilization: float = 0.55  # static arm: fraction of the card vLLM may take (seed's value)
    pair_utilization_b: float = 0.0  # shared_static: B's fraction (0 = 0.90 - A's); --static-shares wins
    static_shares: str = ""  # shared_static: each model's fraction, comma list ('' = 0.90/N; two: see above)
    kvcached_env: str = ""  # extra KEY=VALUE pairs for the kvcached arm, comma separated
    sleep_level: int = 1  # sleep arm: 1 keeps the weights in host memory, 2 drops them (reloaded on waking)
    sleep_after_idle_s: float = 2.0  # shared_sleep, models' traffic at once: idle this long, a model sleeps
    gpu_index: int = 0  # NVML index of the card the servers use
    gpus: str = ""  # e.g. '0,1': run experiments in parallel, one process per card ('' = --gpu-index)
    lane_of: str = ""  # set by --gpus for each card's process: the run folder whose lane it runs
    allow_mixed_gpus: bool = False  # let --gpus mix card models or sizes (recorded; figures differ by card)
    start_timeout_s: float = 900.0  # vLLM start-up: 50-100 s usual, first compile can be longer
    preimport: str = "auto"  # import vLLM ahead for the next servers: auto (>= 8 cores per card), on, off
    engine_start: str = "auto"  # vLLM's engine process: fork (~20 s faster), spawn, auto (shell's or fork)
    # --- workload
    bursts: int = 0  # 0 = preset's value
    arrivals: str = "bursts"  # bursts (closed: all at once) | poisson | gamma | ramp | trace (open loop)
    rate: float = 0.0  # poisson/gamma: requests per second in each window (--bursts windows)
    rates: str = ""  # poisson/gamma: a sweep, one window per rate, e.g. 2,4,8,16 (overrides --rate)
    rates_per_model: str = ""  # poisson/gamma: each model's own requests/s, e.g. 2,8,4 (--bursts windows)
    burstiness: float = 1.0  # gamma arrivals: shape of the gaps (1 = Poisson, below 1 = burstier)
    duration_s: float = 30.0  # poisson/gamma: seconds of arrivals per window; ramp: the longest one may last
    peak_rates: str = ""  # ramp: each model's peak requests/s, one window per peak (a sweep), e.g. 12,16,20
    ramp_step: float = 1.0  # ramp: requests/s added each second on the way up, taken off on the way down
    stagger_s: float = 0.0  # ramp: model i starts this long after model i-1 (0 = once i-1 has peaked)
    trace: str = ""  # trace arrivals: FILE[,FILE...], one per model (cycled): Azure LLM CSV or Mooncake JSONL
    trace_window: str = ""  # trace: START:END seconds into the file, or busiest:SECONDS ('' = all of it)
    trace_speedup: float = 1.0  # trace: time compressed this many times
    trace_rate_scale: str = "1"  # trace: arrivals thinned or repeated (seeded), one window per scale: 0.5,1,2
    burst_size: int = 0  # concurrent requests per burst; 0 = preset (auto: sized to the card)
    gap_s: float = -1.0  # idle seconds between bursts; <0 = preset
    max_tokens: int = 0  # output tokens per request (lognormal mix: at most); 0 = preset
    prompt_tokens: int = -1  # approx. prompt length in tokens; 0 = seed prompts, <0 = preset
    temperature: float = 0.7  # sampling temperature of every request (the seed's value)
    prefix_caching: bool = False  # vLLM's prefix caching (off: repeated prompt parts still need their KV)
    shared_prefix_tokens: int = 0  # tokens of a prefix every planned prompt shares (not a trace's prompts)
    ignore_eos: bool = False  # every response as long as planned (on anyway: dummy weights, trace, a mix)
    output_tokens_dist: str = "fixed"  # output lengths: fixed, uniform:LO-HI or lognormal:MEAN,SIGMA
    slo_ttft_ms: float = 1000.0  # SLO attainment: share of requests with TTFT at most this (0 = none)
    slo_tpot_ms: float = 100.0  # ... and time per output token at most this (0 = no TPOT objective)
    slo_attainment: float = 99.0  # capacity: the % of a rate's requests that must meet the SLOs
    burst_kv_fraction: float = 0.05  # auto preset: one burst's KV demand as a fraction of free VRAM
    max_burst_size: int = 256  # cap on concurrent requests: the auto preset's bursts and the overload's
    seed: int = 0  # RNG seed of the workload plan
    warmup: bool = True  # discarded burst of the same shape before measuring
    plots: bool = True  # draw plots/*.png at the end, or with --report (--no-plots: a second or so less)
    request_timeout_s: float = 300.0  # a ready server can still stall (kvcached without pages)
    # --- overload experiment
    overload_budget_gib: float = 0.0  # KV the models share (static: even split; kvcached: limit); 0 = preset
    overload_demand: float = 1.4  # bursting model's KV demand as a multiple of its static share
    # --- sampling
    sample_hz: float = 20.0  # NVML device-memory samples per second
    process_sample_hz: float = 0.0  # per-process, kvcached shm and /metrics reads a second (0 = preset's)
    release_tolerance: float = 0.05  # 'released' = back within this fraction of the idle level
    release_timeout_s: float = 20.0  # stop waiting for memory to come back after this
    # in 150 real idle windows of 1.5 s, the median of the first or last 0.5 s was the whole one's to the MiB;
    # 1 s also holds two per-process samples (at 0.5 s, often none: each server's idle level was n/a)
    idle_window_s: float = 1.0  # quiet time for an idle level (>= 5 device and 2 per-process samples)
    settle_s: float = 3.0  # stop waiting for release once memory has not moved for this long
    report: str = ""  # rebuild summaries and plots of this run folder (with its own SLOs), run nothing
    check: bool = False  # only print the preflight checklist (run before every run too); exit 2: one failed


# The workload each --preset gives the flags left open. Smoke's bursts last a fraction of a second: each
# server is read as often as the card, or no read falls in them.
PRESET_KNOBS = "bursts burst_size gap_s max_tokens prompt_tokens overload_budget_gib process_sample_hz"
PRESET_WORKLOADS = {
    "seed": dict(zip(PRESET_KNOBS.split(), (3, 6, 6.0, 180, 0, 4.0, 2.0))),
    "smoke": dict(zip(PRESET_KNOBS.split(), (2, 4, 1.0, 16, 64, 2.0, 20.0))),
    "auto": dict(zip(PRESET_KNOBS.split(), (3, 0, 5.0, 128, 768, 4.0, 2.0))),
}


# %% The experiments, as one table
# Each entry is one experiment: its question, the group it is compared in, its arm (how KV memory is
# managed), its servers, its schedule of bursts and the plans those bursts send. Nothing else in this
# file knows experiments by name: adding one is one entry here, plus a server function for a new arm.
@dataclasses.dataclass(frozen=True)
class Step:
    phase: str  # label in summaries and plots
    server: str  # server slot: 'A', 'B', ... (ALL_SLOTS: every model at once)
    plan: str  # key into the plans dict
    burst: int


@dataclasses.dataclass(frozen=True)
class Group:
    """Experiments that answer one question together, one per arm, compared kvcached vs static."""

    name: str  # key of the comparison in summary.json
    pair: bool  # the models share the card (per-model figures) or one model alone
    ratios_by: str  # the latency-ratio table is cut by 'model' or by 'phase'
    plot: str  # file name of the group's memory plot


@dataclasses.dataclass(frozen=True)
class Experiment:
    number: int  # what --experiments also accepts (entries may share a number)
    name: str  # folder and summary key
    group: str  # key of GROUPS
    arm: str  # 'kvcached' or 'static': which side of the comparison
    question: str
    servers: Callable[["Config", int], tuple["ServerSpec", ...]]  # (config, shared KV budget) -> servers
    schedule: Callable[[int, list[str]], tuple[Step, ...]]  # (bursts per plan, slots) -> steps
    plans: tuple[str, ...]  # the plans its steps send
    shares_budget: bool = False  # kvcached limits are set so the pair shares one KV budget


def kvcached_server(cfg: "Config", slot: str) -> "ServerSpec":
    return ServerSpec(slot, model_of(cfg, slot), port_of(cfg, slot), kvcached=True)


def static_server(
    cfg: "Config", slot: str, utilization: float, kv_bytes: Optional[int] = None, sleep_mode: bool = False
) -> "ServerSpec":
    """vLLM's static pool; with `sleep_mode`, asleep between bursts and woken when the next one arrives."""
    return ServerSpec(
        slot,
        model_of(cfg, slot),
        port_of(cfg, slot),
        kvcached=False,
        gpu_memory_utilization=utilization,
        kv_cache_memory_bytes=kv_bytes,
        sleep_mode=sleep_mode,
    )


sleeping_server = functools.partial(static_server, sleep_mode=True)


# vLLM checks at start-up that U x total memory is free even when --kv-cache-memory-bytes fixes the
# KV pool (default U = 0.92 would refuse the second server of a pair); U then only gates start-up.
KV_BYTES_START_GATE = 0.2


STATIC_SPLIT_TOTAL = 0.90  # of the card, split among the models by the static arm
A_BELOW_FOR_DERIVED_B = 0.85  # two models, B's share left open (0.90 minus A's): A's below this


MAX_STATIC_TOTAL = 0.95  # the most of a card static shares take together (the rest: CUDA contexts, baseline)


def shares_total(shares: Iterable[float]) -> float:
    """Fractions of the card added up, to 6 places: 0.9 + 0.05 is 0.95, not 0.9500000000000001."""
    return round(math.fsum(shares), 6)


def static_shares(cfg: "Config") -> list[float]:
    """Each model's --gpu-memory-utilization in shared_static: --static-shares, else 0.90 split evenly
    (two models: --gpu-memory-utilization, the seed's 0.55, and the rest up to 0.90)."""
    if cfg.static_shares:
        return [float(v) for v in cfg.static_shares.split(",")]
    if len(slots(cfg)) == 2:
        return [
            cfg.gpu_memory_utilization,
            cfg.pair_utilization_b or round(STATIC_SPLIT_TOTAL - cfg.gpu_memory_utilization, 2),
        ]
    return [round(STATIC_SPLIT_TOTAL * 100) // len(slots(cfg)) / 100] * len(slots(cfg))


def each_slot(
    make: Callable[["Config", str], "ServerSpec"],
) -> Callable[["Config", int], tuple["ServerSpec", ...]]:
    """Servers for an experiment with every model on the card: make(cfg, slot) per slot."""
    return lambda cfg, budget: tuple(make(cfg, slot) for slot in slots(cfg))


def single_bursts(bursts: int, slots_: list[str]) -> tuple[Step, ...]:
    return tuple(Step(f"burst {b + 1}", "A", "main", b) for b in range(bursts))


def alternating_bursts(bursts: int, slots_: list[str]) -> tuple[Step, ...]:
    return tuple(Step(f"{s} burst {b + 1}", s, "main", b) for b in range(bursts) for s in slots_)


ALL_SLOTS = "*"  # a step's server: every model at once, each on its own plan of the step's family


def concurrent_windows(windows: int, slots_: list[str], family: str = "ramp") -> tuple[Step, ...]:
    """Per-model traffic: every model at once on its own plan (ramp_A, ramp_B, ...), window by window."""
    return tuple(Step(f"{family} {w + 1}", ALL_SLOTS, family, w) for w in range(windows))


def overload_swap(bursts: int, slots_: list[str]) -> tuple[Step, ...]:
    """Each model in turn bursts past its static share while the others idle."""
    return tuple(
        Step(f"{s} bursts, {', '.join(o for o in slots_ if o != s)} idle", s, f"overload_{s}", 0)
        for s in slots_
    )


GROUPS = {
    "single": Group("single", pair=False, ratios_by="model", plot="vram_single_model.png"),
    "shared": Group("shared", pair=True, ratios_by="model", plot="shared_memory.png"),
    "overload": Group("overload", pair=True, ratios_by="phase", plot="overload_memory.png"),
}
COMPARED_ARMS = ("kvcached", "static")  # elastic first: ratios are kvcached / static
OTHER_ARMS = ("sleep",)  # compared with both where present

EXPERIMENTS = [
    Experiment(
        1,
        "kvcached",
        "single",
        "kvcached",
        "How much VRAM does an idle kvcached server keep, and how does its memory follow a bursty load?",
        lambda cfg, budget: (kvcached_server(cfg, "A"),),
        single_bursts,
        ("main",),
    ),
    Experiment(
        2,
        "static",
        "single",
        "static",
        "The same with vLLM's static pool (--gpu-memory-utilization).",
        lambda cfg, budget: (static_server(cfg, "A", cfg.gpu_memory_utilization),),
        single_bursts,
        ("main",),
    ),
    Experiment(
        3,
        "shared_kvcached",
        "shared",
        "kvcached",
        "{Two} models on one GPU, {both} elastic, alternating bursts.",
        each_slot(kvcached_server),
        alternating_bursts,
        ("main",),
    ),
    Experiment(
        4,
        "shared_static",
        "shared",
        "static",
        "The same {pair} split statically (--gpu-memory-utilization per model).",
        lambda cfg, budget: tuple(
            static_server(cfg, slot, share) for slot, share in zip(slots(cfg), static_shares(cfg))
        ),
        alternating_bursts,
        ("main",),
    ),
    Experiment(
        5,
        "overload_kvcached",
        "overload",
        "kvcached",
        "One model bursts past its static share while {the other idles}; an elastic {pair} sharing one "
        "KV budget (kvcached's per-instance limits).",
        each_slot(kvcached_server),
        overload_swap,
        ("overload",),
        shares_budget=True,
    ),
    Experiment(
        5,
        "overload_static",
        "overload",
        "static",
        "The same load on a static {pair} with {half the KV budget} each (--kv-cache-memory-bytes).",
        lambda cfg, budget: tuple(
            static_server(cfg, s, KV_BYTES_START_GATE, budget // len(slots(cfg))) for s in slots(cfg)
        ),
        overload_swap,
        ("overload",),
    ),
    Experiment(
        6,
        "sleep",
        "single",
        "sleep",
        "The static pool with vLLM's sleep mode: put to sleep after each burst and woken when the next "
        "one arrives, as a router would (the wake-up is part of the first requests' latency).",
        lambda cfg, budget: (sleeping_server(cfg, "A", cfg.gpu_memory_utilization),),
        single_bursts,
        ("main",),
    ),
    Experiment(
        7,
        "shared_sleep",
        "shared",
        "sleep",
        "{Two} models time-sharing the card with sleep mode: each gets the static arm's share while awake, "
        "and only the one that bursts is awake (the {other was} put to sleep after {its own burst}).",
        lambda cfg, budget: tuple(sleeping_server(cfg, s, cfg.gpu_memory_utilization) for s in slots(cfg)),
        alternating_bursts,
        ("main",),
    ),
]
SEED_EXPERIMENTS = (1, 2, 3)  # the tutorial's three: --experiments seed


def experiment(name: str) -> Optional[Experiment]:
    return next((e for e in EXPERIMENTS if e.name == name), None)


def parse_experiments(spec: str) -> list[Experiment]:
    """'1,3', 'kvcached,static', 'seed' or 'all' -> entries in run order: grouped by arm so that a
    server started for one experiment serves the next ones too (kvcached A serves 1, 3 and 5)."""
    chosen: list[Experiment] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token == "all":
            found = list(EXPERIMENTS)
        elif token == "seed":
            found = [e for e in EXPERIMENTS if e.number in SEED_EXPERIMENTS]
        else:
            found = [e for e in EXPERIMENTS if token in (e.name, str(e.number))]
        if not found:
            numbered = {e.number: [] for e in EXPERIMENTS}
            for e in EXPERIMENTS:
                numbered[e.number].append(e.name)
            listed = ", ".join(f"{n} {' and '.join(names)}" for n, names in numbered.items())
            raise ConfigError(
                f"--experiments: unknown experiment {token!r}; choose names or numbers from {listed}, "
                "or 'seed' or 'all'"
            )
        chosen += [e for e in found if e not in chosen]
    if not chosen:
        raise ConfigError("--experiments: nothing chosen")
    arms = list(dict.fromkeys(e.arm for e in EXPERIMENTS))
    return sorted(chosen, key=lambda e: (arms.index(e.arm), EXPERIMENTS.index(e)))


def group_arms(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """group -> {arm: experiment name} for the experiments present, from the table."""
    out: dict[str, dict[str, str]] = {}
    for name in names:
        entry = experiment(name)
        if entry is not None:
            out.setdefault(entry.group, {})[entry.arm] = name
    return out


# %% What one experiment does
# Start (or reuse) its servers; sample memory from an idle baseline; warm up; take the idle level;
# send the planned bursts; wait for the memory to come back; write everything down as it happens.
@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """One table entry resolved against the config: concrete servers and steps."""

    name: str
    question: str
    servers: tuple["ServerSpec", ...]
    steps: tuple[Step, ...]
    kv_budget: int = 0  # bytes of KV memory the kvcached pair may hold together


def resolve_experiment(
    entry: Experiment, cfg: "Config", plans: dict[str, "WorkloadPlan"], budget_bytes: int
) -> ExperimentSpec:
    n = len(slots(cfg))  # the questions' words for n models; for two, as the tutorial says them
    two = ("Two", "both", "pair", "the other idles", "other was", "its own burst", "half the KV budget")
    many = (str(n), "all", f"set of {n} models", "the others idle", "others were", "their own bursts")
    many += (f"1/{n} of the KV budget",)
    schedule, question = entry.schedule, entry.question.format(**dict(zip(two, two if n == 2 else many)))
    family = per_model_family(cfg)
    if family and schedule is alternating_bursts:  # the models' traffic overlaps in time
        words = {"ramp": "staggered ramps", "trace": "replayed traces", "open": "rates of their own"}[family]
        schedule = functools.partial(concurrent_windows, family=family)
        question = question.replace("alternating bursts", words)
        if entry.arm == "sleep":
            question = (
                f"{question.split(' with sleep mode')[0]} with sleep mode under {words}: a router wakes a "
                f"model for its requests, puts it back to sleep after {cfg.sleep_after_idle_s:g} s idle, and "
                f"keeps at most {awake_at_most(cfg)} awake (the static arm's share each)."
            )
    return ExperimentSpec(
        entry.name,
        question,
        entry.servers(cfg, budget_bytes),
        schedule(plans["main"].bursts, slots(cfg)),
        budget_bytes if entry.shares_budget else 0,
    )


def run_experiment(
    cfg: "Config",
    exp: ExperimentSpec,
    plans: dict[str, "WorkloadPlan"],
    pool: "ServerPool",
    nvml: Any,
    exp_dir: Path,
    when_ready: Callable[[], None] = lambda: None,
) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    say(f"\n=== {exp.name}: {exp.question}")
    record = ExperimentRecord(
        exp.name,
        exp.question,
        steps=[dataclasses.asdict(s) for s in exp.steps],
        repeats=cfg.repeats,
        sample_interval_s=1 / cfg.sample_hz,
        gpu_index=cfg.gpu_index,
    )
    write_json(exp_dir / "experiment.json", record)  # a run killed from here on can still be reported
    before = list(pool.running.values())  # the very servers: one restarted since has their key, not their log
    try:
        servers = pool.ensure(list(exp.servers), exp_dir)
    except BaseException:  # the servers that did come up were paid for (or reused) all the same
        wanted = {spec.key for spec in exp.servers}
        record_servers(record, [s for key, s in pool.running.items() if key in wanted], before)
        write_json(exp_dir / "experiment.json", record)
        raise
    record_servers(record, servers, before)
    when_ready()  # e.g. the pool prepares the next experiment's servers while this one measures
    sampler = Sampler(
        nvml, cfg.gpu_index, servers, exp_dir / "memory.jsonl", cfg.sample_hz, cfg.process_sample_hz
    )
    sampler.start()
    trial = Trial(cfg, exp, plans, {s.spec.name: s for s in servers}, sampler, record, exp_dir)
    try:
        measure(trial)
        record.finished = True
    finally:
        trial.close()


# %% main(): resolve the config, open the run folder, run the table, report
@dataclasses.dataclass
class Run:
    """Everything one run needs, settled before the first server starts."""

    cfg: "Config"
    experiments: list[Experiment]  # run order: it numbers the experiment folders
    nvml: Any
    plans: dict[str, "WorkloadPlan"]
    budget: int  # bytes of KV memory each overload pair shares
    run_dir: Path
    config: dict  # what config.json holds
    lanes: list[Lane]
    runner_env: dict[str, str]  # every server's model-runner setting (model_runner_env)
    import_checks: Optional["concurrent.futures.Future[list[Check]]"] = None  # still running: --preimport
    config_file: str = "config.json"  # a card's process of a --gpus run writes its own (lane_file)

    def save_config(self) -> None:
        with stopped_if_unwritable(self.run_dir):
            write_json(self.run_dir / self.config_file, self.config)


def main(
    argv: "Optional[list[str] | str]" = None, nvml_module: Any = None, out: Callable[[str], None] = print
) -> int:
    """Exit code: 0 all measured; 1 an experiment failed or its memory figures are void; 2 bad input
    (nothing launched); 130 interrupted. Messages go to `out`, scrubbed of secrets."""
    global STATE
    STATE = RunState(out)
    for cached in (read_trace, hub_file):  # a notebook's earlier call: a trace edited, a token set since
        cached.cache_clear()
    started, run, cfg = time.time(), None, None
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a card's process held them since its start
        argv = given_argv(argv)  # once: for the config, each card's process, config.json
        cfg = config_from_args(argv)
        if cfg is None:  # --help
            return 0
        if cfg.report or cfg.check:
            with stop_signals():  # SIGTERM and SIGHUP end them as Ctrl-C does
                if cfg.report:
                    return report_command(Path(cfg.report), cfg.plots)
                return check_command(cfg, nvml_module)
        if cfg.lane_of:  # one card's process of a --gpus run: its experiments, no report
            interrupted, failures = run_table(join_run(cfg, nvml_module))
            return 130 if interrupted else (1 if failures else 0)
        with stop_signals():  # SIGTERM and SIGHUP too: the import check's Python is stopped with us
            run = prepare_run(cfg, argv, nvml_module)
        run.config["timing"] = {"started": started}
        interrupted, failures = run_lanes(run, argv) if len(run.lanes) > 1 else run_table(run)
    except (ConfigError, ReportError) as exc:
        if run is not None:  # vLLM's import check, run beside the first imports, failed: no run
            shutil.rmtree(run.run_dir, ignore_errors=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ResultsUnwritable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before any experiment: the preflight, a --check, a --report
        if run is not None and not experiment_dirs(run.run_dir):
            shutil.rmtree(run.run_dir, ignore_errors=True)
        again = f"; run --report {cfg.report} again" if cfg and cfg.report else ""
        print(f"interrupted before anything was measured{again}", file=sys.stderr)
        return 130
    run.config["timing"]["table_end"] = time.time()
    return report_run(run, interrupted, failures)


def run_table(run: Run) -> tuple[bool, int]:
    """Every experiment of the run's one lane, servers kept across experiments where they fit, all
    stopped at the end. Returns (interrupted, failed experiments)."""
    (lane,) = run.lanes
    env = {**pin_to_card(lane.gpu, lane.cfg.gpu_index), **run.runner_env}
    pool = ServerPool(lane.cfg, env, ahead_for(lane.cfg, env))
    # A burst runs hundreds of request threads; each waits its turn for the interpreter. A shorter
    # switch interval keeps that wait short for each stream's timestamps and the sampler's reader.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, 0.001))
    interrupted, failures = False, 0
    with stop_signals():
        try:
            import_first_servers(run, pool)
            run.config["timing"]["table_start"] = time.time()
            failures = run_lane_experiments(run, lane, pool)
        except (KeyboardInterrupt, Exception) as exc:
            if not caused_by_a_signal(exc):
                raise
            interrupted = True
            STATE.signals_seen = max(STATE.signals_seen, 1)  # a notebook's stop button shows only here
            say("\ninterrupted: stopping every server before leaving")
        finally:
            interrupted = stop_every_server(pool) or interrupted
            sys.setswitchinterval(switch_interval)
            with contextlib.suppress(Exception):
                run.nvml.nvmlShutdown()
    return interrupted, failures


def experiment_dir(run: Run, entry: Experiment) -> Path:
    return run.run_dir / f"{run.experiments.index(entry) + 1:02d}_{entry.name}"


def run_lane_experiments(run: Run, lane: Lane, pool: "ServerPool") -> int:
    """A lane's experiments in turn; one that fails is written down and the next one runs. Returns how
    many failed."""

    def resolved(entry: Experiment) -> ExperimentSpec:
        return resolve_experiment(entry, lane.cfg, run.plans, run.budget)

    def prepare(upcoming: Optional[Experiment]) -> None:  # the next experiment's servers, ahead
        if upcoming is not None:
            pool.prepare(resolved(upcoming).servers, experiment_dir(run, upcoming))

    failures = 0
    for entry, upcoming in zip(lane.experiments, lane.experiments[1:] + [None]):
        exp_dir = experiment_dir(run, entry)
        prepare_next = functools.partial(prepare, upcoming)
        try:
            with stopped_if_unwritable(run.run_dir):
                run_experiment(lane.cfg, resolved(entry), run.plans, pool, run.nvml, exp_dir, prepare_next)
        except Exception as exc:  # this experiment failed; the others still run
            if caused_by_a_signal(exc):  # the run was told to stop: no other experiment starts
                raise KeyboardInterrupt(f"{type(exc).__name__} while interrupted") from exc
            if isinstance(exc, ResultsUnwritable):
                raise
            failures += 1
            write_failure(exp_dir, entry, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        finally:
            for server in list(pool.running.values()):
                run.config["servers"][server.spec.label] = server.describe()
            run.save_config()
    return failures


def report_run(run: Run, interrupted: bool, failures: int) -> int:
    run.config["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    run.config["interrupted"] = interrupted
    try:
        run.save_config()
        with stop_signals():
            result = build_report(run.run_dir, draw_plots=run.cfg.plots)
    except (KeyboardInterrupt, Exception) as exc:  # the raw files are safe; --report rebuilds the report
        stopped = caused_by_a_signal(exc)
        why = "was interrupted" if stopped else f"failed ({type(exc).__name__}: {exc})"
        print(
            f"error: building the report {why}; raw results are in {run.run_dir}; retry with --report "
            f"{run.run_dir}",
            file=sys.stderr,
        )
        return 130 if stopped else 1
    say(f"\nsummary: {run.run_dir / 'summary.md'}")
    for name in result["invalid"]:
        say(f"WARNING: {name}: memory figures void ({'; '.join(result['problems'].get(name, []))})")
    if running_in_notebook():
        show_in_notebook(run.run_dir)
    say(json.dumps(readable(result)))
    return 130 if interrupted else (1 if failures or result["invalid"] else 0)


# %% Appendix: the machinery, one cell per concern
# Lanes, configuration parsing, model facts, workload plans, secrets, server lifecycle, kvcached's segment,
# memory sampling, load generation, metrics, summaries, plots, report, run set-up, signals.


# %% Lanes: with --gpus, experiments run in parallel, one harness process per card
# Experiments that share a server (kvcached A serves 1, 3 and 5) form one unit and stay in one lane, so
# no server starts twice. Units go greedily, longest first, to the least loaded lane (by a rough estimate
# of start-ups and bursts); a unit is split into its experiments where that ends sooner. Each lane is a
# process of its own (this script with --lane-of): its card, ports (+LANE_PORT_STEP per lane), kvcached
# segments, sampler and keepers. All write into one run folder; the first process reports.
LANE_PORT_STEP = 100
START_ESTIMATE_S = 60.0  # one vLLM start-up, for the scheduler's estimates only
BURST_ESTIMATE_S = 10.0  # one burst


@dataclasses.dataclass
class Lane:
    """One card and the experiments it runs, in order."""

    cfg: "Config"  # the run's config with this card's index and ports
    gpu: dict  # the card's facts (gpu_facts)
    experiments: list[Experiment]


def gpu_indices(cfg: "Config") -> list[int]:
    return [int(i) for i in cfg.gpus.split(",")] if cfg.gpus else [cfg.gpu_index]


def lane_config(cfg: "Config", lane: int, gpu_index: int) -> "Config":
    step = LANE_PORT_STEP * lane
    return dataclasses.replace(
        cfg,
        gpu_index=gpu_index,
        port_a=cfg.port_a + step,
        port_b=cfg.port_b + step,
        port=cfg.port and cfg.port + step,
    )


def server_units(experiments: list[Experiment], cfg: "Config", budget: int) -> list[list[Experiment]]:
    """Experiments joined when they share a server, in run order."""
    units: list[tuple[set, list[Experiment]]] = []
    for entry in experiments:
        keys = {spec.key for spec in entry.servers(cfg, budget)}
        joined = [u for u in units if u[0] & keys]
        merged = (keys.union(*(u[0] for u in joined)), [e for u in joined for e in u[1]] + [entry])
        units = [u for u in units if not any(u is j for j in joined)] + [merged]
    return [sorted(exps, key=experiments.index) for _, exps in units]


def lane_estimate_s(lane: list[Experiment], cfg: "Config", budget: int, bursts: int) -> float:
    """A lane's rough duration, for the scheduler: start-ups (kvcached ones together) and bursts with gaps."""
    running: set = set()
    total = 0.0
    burst_s = BURST_ESTIMATE_S if cfg.arrivals == "bursts" else BURST_ESTIMATE_S + cfg.duration_s
    for entry in lane:
        specs = {spec.key: spec for spec in entry.servers(cfg, budget)}
        new = [spec for key, spec in specs.items() if key not in running]
        starts = sum(not spec.kvcached for spec in new) + any(spec.kvcached for spec in new)
        steps = len(entry.schedule(bursts, slots(cfg))) * cfg.repeats
        total += starts * START_ESTIMATE_S + steps * (burst_s + max(cfg.gap_s, 0))
        running = set(specs)
    return total


def plan_lanes(
    experiments: list[Experiment], cfg: "Config", budget: int, bursts: int, lanes: int
) -> list[list[Experiment]]:
    """Experiments per lane, each lane in run order; the same single list when there is one lane."""

    def cost(group: list[Experiment]) -> float:
        return lane_estimate_s(sorted(group, key=experiments.index), cfg, budget, bursts)

    def assign(units: list[list[Experiment]]) -> list[list[Experiment]]:
        plan: list[list[Experiment]] = [[] for _ in range(lanes)]
        for unit in sorted(units, key=cost, reverse=True):  # longest first, to the least loaded lane
            min(plan, key=cost).extend(unit)
        return [sorted(lane, key=experiments.index) for lane in plan]

    units = server_units(experiments, cfg, budget)
    best = assign(units)
    for unit in sorted(units, key=cost, reverse=True):  # split a unit where that ends sooner
        if len(unit) > 1:
            split = [u for u in units if u is not unit] + [[e] for e in unit]
            tried = assign(split)
            if max(map(cost, tried)) < max(map(cost, best)):
                units, best = split, tried
    return best


def run_lanes(run: Run, argv: list[str]) -> tuple[bool, int]:
    """One process per card; their lines come out here, prefixed with the card, and a signal here is passed
    on to each, once. Returns (interrupted, failed experiments; a dead lane's unfinished ones count)."""
    if run.import_checks is not None:
        try:
            with stop_signals():  # a SIGTERM meanwhile ends the run as interrupted, not this process at once
                confirm_imports(run)
        except KeyboardInterrupt:
            say("\ninterrupted during vLLM's import check: no card's process has started")
            return True, 0
    run.config["timing"]["table_start"] = time.time()
    lanes: dict[int, subprocess.Popen] = {}  # by card
    signals: list[int] = []

    def pass_on(signum, frame):
        if not signals:
            say("\ninterrupted: each card's process stops its servers")
        signals.append(signum)
        for process in lanes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    restore = {}
    for sig in STOP_SIGNALS:
        # off the main thread (a notebook's worker) the signals stay theirs
        with contextlib.suppress(ValueError):
            restore[sig] = signal.signal(sig, pass_on)
    command = [sys.executable, script_file(), *argv]
    try:
        for index in (lane.cfg.gpu_index for lane in run.lanes):  # one that cannot start stops them all
            if not signals:  # interrupted meanwhile: the rest never start
                lanes[index] = start_card_process([*command, "--lane-of", str(run.run_dir)], index)
                if signals:  # came while it was starting, before pass_on could see it
                    lanes[index].send_signal(signals[0])
        relay_output(lanes)
        # a card's process that a passed-on signal ended before it could catch one was interrupted too
        codes = {i: 130 if -p.wait() in signals else p.returncode for i, p in lanes.items()}
    finally:  # after an error: each card's process still running is terminated, then killed
        for process in lanes.values():
            if process.poll() is None:
                process.terminate()
        for process in lanes.values():
            try:
                process.wait(timeout=60.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    failures = sum(gather_lane(run, lane, codes.get(lane.cfg.gpu_index, 130)) for lane in run.lanes)
    run.save_config()
    return bool(signals) or 130 in codes.values(), failures


def start_card_process(command: list[str], index: int) -> subprocess.Popen:
    """This script for card `index`, holding a passed-on signal until its main() reads it: one that came
    while it imported showed its traceback."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(
            [*command, "--gpu-index", str(index)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", LANE_PARENT: str(os.getpid())},
            start_new_session=True,  # a terminal's Ctrl-C reaches it once, through pass_on
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def script_file() -> Optional[str]:
    """This script's file, which each card's process runs: none when pasted into a notebook cell, where a
    __file__ that an earlier `%run -i other.py` left is not the file this code came from."""
    path, ours = globals().get("__file__"), Path(script_file.__code__.co_filename)
    same = path and Path(path).is_file() and ours.is_file() and Path(path).resolve() == ours.resolve()
    return path if same else None


def relay_output(lanes: dict[int, subprocess.Popen]) -> None:
    """Every line of each card's process, prefixed with its card, until they have all closed them."""
    import selectors

    selector = selectors.DefaultSelector()
    pending: dict[int, bytes] = {}
    for index, process in lanes.items():
        for stream, to in (
            (process.stdout, say),
            (process.stderr, lambda x: print(scrub(x), file=sys.stderr)),
        ):
            selector.register(stream, selectors.EVENT_READ, (f"[GPU {index}] ", to))
            pending[stream.fileno()] = b""
    while selector.get_map():
        for key, _ in selector.select():
            chunk = os.read(key.fd, 1 << 16)
            prefix, to = key.data
            lines = (pending[key.fd] + chunk).split(b"\n")
            pending[key.fd] = lines.pop() if chunk else b""
            for line in lines if chunk else [x for x in lines if x]:
                text = line.decode(errors="replace")
                to(prefix + text if text.strip() else text)
            if not chunk:
                selector.unregister(key.fileobj)


def lane_file(gpu_index: int) -> str:
    return f".lane_gpu{gpu_index}.json"


def gather_lane(run: Run, lane: Lane, code: int) -> int:
    """A card's process has ended: its servers go into config.json; returns its failed experiments."""
    index = lane.cfg.gpu_index
    facts_file = run.run_dir / lane_file(index)
    facts, _ = read_json(facts_file)
    for label, server in ((facts or {}).get("servers") or {}).items():
        run.config["servers"][f"{label} on GPU {index}"] = server
    facts_file.unlink(missing_ok=True)
    failed = 0
    for entry in lane.experiments:
        exp_dir = experiment_dir(run, entry)
        # unfinished and not failed: the process died (any exit code, 0 and 1 too), unless interrupted
        if code != 130 and not (exp_dir / "error.json").exists():
            record, _ = read_json(exp_dir / "experiment.json")
            if not (isinstance(record, dict) and record.get("finished")):
                why = f"the process running GPU {index}'s lane ended (exit code {code}) before it finished"
                write_failure(exp_dir, entry, why)
        failed += (exp_dir / "error.json").exists()
    return failed


LANE_PARENT = "RUN_EXPERIMENTS_LANE_PARENT"  # the pid of the process that started a card's process


def check_lane_starter() -> None:
    """The process that started this card's is still its parent: one killed before PR_SET_PDEATHSIG took
    hold sends no signal, and the card's process would run its whole table alone."""
    parent = os.environ.get(LANE_PARENT)
    if not parent:  # by hand, it would run experiments again into a finished run's folder
        raise ConfigError("--lane-of: set by --gpus for each card's process, not by hand; use --gpus")
    if os.getppid() != int(parent):
        raise ConfigError(
            f"--lane-of: the run's first process (pid {parent}) ended before this card's started"
        )


def join_run(cfg: "Config", nvml_module: Any) -> Run:
    """A card's process of a --gpus run: the run the first process prepared, for this card's lane."""
    register_secrets(cfg)
    # Told to stop (SIGTERM, as from Ctrl-C) when the process that started it dies, even by SIGKILL
    # (Linux; elsewhere its servers' keepers still stop them when it ends)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    check_lane_starter()
    run_dir = Path(cfg.lane_of)
    config, problem = read_json(run_dir / "config.json")
    lane = next((x for x in (config or {}).get("lanes", []) if x["gpu_index"] == cfg.gpu_index), None)
    if lane is None:
        raise ConfigError(
            f"--lane-of: {run_dir} has no lane for GPU {cfg.gpu_index} ({problem or 'no such lane'})"
        )
    lane_cfg = lane_config(cfg, config["lanes"].index(lane), cfg.gpu_index)
    experiments = parse_experiments(cfg.experiments)
    gpu = next(card for card in config["gpus"] if card["index"] == cfg.gpu_index)
    plans = load_plans(run_dir)
    ensure_open_files(most_sockets(plans, lane_cfg, experiments))
    return Run(
        lane_cfg,
        experiments,
        open_gpu(nvml_module, [cfg.gpu_index], "--gpu-index"),
        plans,
        config["overload_budget_bytes"],
        run_dir,
        {"servers": {}, "timing": {}},
        [Lane(lane_cfg, gpu, [e for e in experiments if e.name in lane["experiments"]])],
        config["model_runner_env"],
        config_file=lane_file(cfg.gpu_index),
    )


# %% Records of an experiment: experiment.json's phase marks and facts
def omitted_if_none() -> Any:
    """A record field left out of the JSON when it is None (a section that does not apply)."""
    return dataclasses.field(default=None, metadata={"omit_if_none": True})


def record_servers(record: "ExperimentRecord", servers: list["RunningServer"], before: list) -> None:
    """The experiment's servers, and where each one's log stands: its lines from here on are this
    experiment's (a reused server's log holds the earlier experiments' too)."""
    kept = {id(s) for s in servers if any(s is earlier for earlier in before)}
    record.servers = [
        {**s.describe(), "log_lines": [log_lines(s.log_path) if id(s) in kept else 0]} for s in servers
    ]
    record.reused = [s.spec.label for s in servers if id(s) in kept]


def to_json(obj: Any) -> Any:
    """Records as JSON-ready dicts (optional sections left out when absent), no Infinity/NaN."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_json(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.metadata.get("omit_if_none") and getattr(obj, f.name) is None)
        }
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


Span = tuple[float, float]  # (start, end), wall clock


@dataclasses.dataclass
class Marks:
    """When each phase of an experiment happened (wall clock), for summaries and plots."""

    idle_after_load: Optional[Span] = omitted_if_none()  # quiet window right after the servers are up
    warmup: Optional[Span] = omitted_if_none()
    idle_before: Optional[Span] = omitted_if_none()  # quiet window after the warm-up: the idle level
    workload: Optional[Span] = omitted_if_none()  # first burst start to last burst end
    sampling_end: Optional[float] = omitted_if_none()
    # under the sleep router: when every model was asleep again after the last window
    asleep: Optional[float] = omitted_if_none()
    bursts: list["BurstMark"] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> "Marks":
        times = {k: tuple(v) if isinstance(v, list) else v for k, v in known_fields(cls, data).items()}
        bursts = data.get("bursts") or []
        of_kind(bursts, {"repeat": int, "phase": str, "server": str}, "marks.bursts")
        return cls(**{**times, "bursts": [BurstMark(**b) for b in bursts]})


def of_kind(entries: list[dict], kinds: dict[str, type], where: str) -> None:
    """A TypeError (the report names the experiment as unreadable) where an entry's field is of another kind;
    None stands for not known."""
    for entry in entries:
        for key, kind in kinds.items():
            value = entry.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise TypeError(f"{where}: a {key} of the wrong kind ({type(value).__name__})")


@dataclasses.dataclass
class BurstMark:
    phase: str
    server: str
    repeat: int
    start: float
    end: Optional[float] = None  # None: cut off (interrupted, killed)
    # the server's latency histograms (sums and counts, /metrics) right before and after the burst
    server_before: Optional[dict] = None
    server_after: Optional[dict] = None
    wake_s: Optional[float] = None  # sleep arm: the wake-up its first request paid for
    rate: Optional[float] = None  # open loop: the planned arrival rate of this window (requests/s)
    sleep_s: Optional[float] = None  # sleep arm: putting the server back to sleep after it
    # what `rate` counts when not requests/s: TRACE_SCALE (a trace's rate scale; the report shows it times
    # --trace-speedup) or RAMP_PEAK (each model's peak)
    rate_unit: Optional[str] = None


def mark_rate(burst: BurstMark, plans: list["WorkloadPlan"], window: int) -> None:
    """An open-loop window's planned rate on its mark: the models' own rates (--rates-per-model) add up;
    a ramp's peak and a trace's rate scale are each model's."""
    first = plans[0]
    if first.rates:
        each = first.arrivals in PER_MODEL_ARRIVALS
        burst.rate = first.rates[window] if each else math.fsum(p.rates[window] for p in plans)
        burst.rate_unit = RATE_UNITS.get(first.arrivals)


TRACE_SCALE = "x trace"
RAMP_PEAK = "req/s peak per model"  # a ramp's rate is each model's peak, not what the card takes
RATE_UNITS = {"trace": TRACE_SCALE, "ramp": RAMP_PEAK}  # by --arrivals; requests/s for the others


def rates_as_reported(marks: "Marks", arrivals: Optional[str], trace_speedup: Optional[float]) -> None:
    """A trace's window is marked with its --trace-rate-scale; replayed --trace-speedup times faster, it
    arrived at their product times the trace's own rate, which the report shows. Runs from before marks
    kept their unit: the run's --arrivals tells it."""
    for burst in marks.bursts:
        if burst.rate is not None and burst.rate_unit is None:
            burst.rate_unit = RATE_UNITS.get(arrivals or "")
        if burst.rate is not None and burst.rate_unit == TRACE_SCALE:
            burst.rate = round(burst.rate * (trace_speedup or 1.0), 6)


@dataclasses.dataclass
class ExperimentRecord:
    """experiment.json: what ran, on which servers, and when; written at the start and after each burst."""

    name: str
    question: str
    servers: list[dict] = dataclasses.field(default_factory=list)  # RunningServer.describe() of each
    reused: list[str] = dataclasses.field(default_factory=list)  # labels of servers kept from before
    steps: list[dict] = dataclasses.field(default_factory=list)
    repeats: int = 1
    sample_interval_s: Optional[float] = None
    finished: bool = False
    sampler_errors: int = 0
    sampler_error_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    kv_limits: dict[str, int] = dataclasses.field(default_factory=dict)
    gpu_index: Optional[int] = None  # the card it ran on (NVML index)
    sleep_level: Optional[int] = None  # sleep arm: the level its server slept at between bursts
    sampler_missed_ticks: int = 0  # device samples skipped because the sampler was late
    # sleep arm under every model's traffic: per model, seconds of each wake-up, each sleep, each wait
    router: Optional[dict[str, dict[str, list[float]]]] = None
    after_warmup: Optional[str] = omitted_if_none()  # "timeout": memory had not settled when idle was taken
    marks: Marks = dataclasses.field(default_factory=Marks)  # last in experiment.json

    @classmethod
    def from_json(cls, data: dict) -> "ExperimentRecord":
        marks = Marks.from_json(data.get("marks") or {})
        of_kind(data.get("servers") or [], SERVER_FIELD_KINDS, "servers")
        card = data.get("gpu_index") if type(data.get("gpu_index")) is int else None  # a damaged file's
        # `finished` is missing only from runs older than the field, and those finished
        fields = {**known_fields(cls, data), "marks": marks, "gpu_index": card}
        return cls(**{**fields, "finished": data.get("finished", True)})


SERVER_FIELD_KINDS = {
    "label": str,
    "startup_s": (int, float),
    "started_at": (int, float),
    "ready_at": (int, float),
}


def known_fields(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


# %% Experiment steps: the trial, the measurement, warm-up, one burst, a shared KV budget
@dataclasses.dataclass
class Trial:
    """What the steps of one experiment share: its config, servers (by slot), sampler and record."""

    cfg: "Config"
    exp: ExperimentSpec
    plans: dict[str, "WorkloadPlan"]
    servers: dict[str, "RunningServer"]
    sampler: "Sampler"
    record: "ExperimentRecord"
    folder: Path
    limits_before: dict[str, int] = dataclasses.field(default_factory=dict)  # kvcached segment -> bytes
    router: Optional["SleepRouter"] = None  # sleep-mode servers under every model's traffic at once
    # set when a model of a window under every model's traffic failed: the others send no more
    halt: threading.Event = dataclasses.field(default_factory=threading.Event)

    def save(self) -> None:
        write_json(self.folder / "experiment.json", self.record)

    def close(self) -> None:
        """Give kvcached its limits back, stop sampling, and write the record down: a signal meanwhile (a
        second Ctrl-C right after the first) is raised once the record is written, not in its middle."""
        with signals_held("interrupted while a record was written"):
            self.write_down()

    def write_down(self) -> None:
        for ipc, total in self.limits_before.items():
            with contextlib.suppress(OSError):
                write_segment_limit(ipc, total)
        marks = self.record.marks
        marks.sampling_end = time.time()  # before the stop, which may wait for a slow read to end
        self.sampler.stop()
        for burst in marks.bursts:  # a burst cut short by an interrupt ends here
            burst.end = burst.end or marks.sampling_end
        self.record.sampler_errors = self.sampler.errors
        self.record.sampler_error_kinds = dict(self.sampler.error_kinds)
        self.record.sampler_missed_ticks = self.sampler.missed_ticks
        for described, server in zip(self.record.servers, self.servers.values()):
            described["log_lines"].append(log_lines(server.log_path))
        self.save()


def measure(trial: Trial) -> None:
    """Idle after load, warm-up, idle before the workload, the workload, and the release after it."""
    cfg, record, sampler = trial.cfg, trial.record, trial.sampler
    marks = record.marks
    marks.idle_after_load = sleep_idle_window(cfg.idle_window_s)
    trial.save()
    if trial.exp.kv_budget:
        record.kv_limits = apply_pair_budget(trial.exp.kv_budget, trial.servers, trial.limits_before)
    start = time.time()
    warmed = cfg.warmup and warm_up(trial)
    if warmed:
        marks.warmup = (start, time.time())
        after_load = window_median(list(sampler.device), *marks.idle_after_load)
        outcome = wait_settled(sampler, after_load, cfg)
        record.after_warmup = outcome if outcome == "timeout" else None
        say(f"  after warm-up memory {outcome}")
    woke = False
    for server in [s for s in trial.servers.values() if s.spec.sleep_mode]:  # the sleep arm idles asleep
        record.sleep_level = cfg.sleep_level
        woke = put_to_sleep(server, cfg) is not None or woke
    # with nothing sent since the idle window after load, that window is the idle level too
    marks.idle_before = sleep_idle_window(cfg.idle_window_s) if warmed or woke else marks.idle_after_load
    idle = window_median(list(sampler.device), *marks.idle_before)
    forget_served_prompts(trial)
    workload_start = time.time()
    sink = RecordSink(trial.folder / "requests.jsonl")
    if record.sleep_level is not None and any(step.server == ALL_SLOTS for step in trial.exp.steps):
        trial.router = SleepRouter(trial.servers, cfg, awake_at_most(cfg))
    try:
        for n, (repeat, step) in enumerate(itertools.product(range(cfg.repeats), trial.exp.steps)):
            if n:
                pause(cfg.gap_s)
            if n and step is trial.exp.steps[0]:  # a repeat: the same prompts again
                forget_served_prompts(trial)
            run_measured_step(trial, step, repeat, sink)
            trial.save()
    finally:
        if trial.router:
            trial.router.stop()
            record.router, marks.asleep = trial.router.log, time.time()
    # the workload ends with the last burst: putting a sleeping server back to sleep is part of its release
    marks.workload = (workload_start, marks.bursts[-1].end if marks.bursts else time.time())
    outcome = wait_settled(sampler, idle, cfg)
    for server in trial.servers.values():  # a server that died gives its memory back: that is no release
        server.fail_if_dead("after the workload")
    say(f"  after the workload memory {outcome} ({time.time() - marks.workload[1]:.1f} s)")


def forget_served_prompts(trial: Trial) -> None:
    """--prefix-caching: empty each awake server's prefix cache, so that only what the workload's own
    requests share is a hit. The warm-up sent the first burst's prompts, and a repeat or a reused server
    serves prompts it has served (a sleeping server's cache was emptied as it fell asleep)."""
    for server in trial.servers.values() if trial.cfg.prefix_caching else ():
        if not server.asleep:
            try:
                sleep_call(server, "/reset_prefix_cache", trial.cfg.api_key)
            except ServerError as exc:
                raise ServerError(
                    f"--prefix-caching: the cache was not emptied before measuring: {exc}"
                ) from exc


def run_measured_step(trial: Trial, step: Step, repeat: int, sink: "RecordSink") -> None:
    """One burst (or open-loop window), marked with vLLM's own counters before and after it."""
    each = [slot_step(step, slot) for slot in trial.servers] if step.server == ALL_SLOTS else [step]
    burst = BurstMark(step.phase, step.server, repeat, time.time())
    mark_rate(burst, [trial.plans[s.plan] for s in each], step.burst)
    trial.record.marks.bursts.append(burst)
    if step.server == ALL_SLOTS:
        return run_concurrent_window(trial, each, burst, sink)
    server, cfg = trial.servers[step.server], trial.cfg
    before = server_latency_snapshot(server)
    gate = WakeGate(server, cfg) if server.spec.sleep_mode else None
    records = run_step(trial, step, repeat, sink, gate)
    burst.end = time.time()
    burst.server_before = before
    burst.server_after = server_latency_snapshot(server, expect=before, finished=sum(r.ok for r in records))
    if gate is not None:
        burst.wake_s = gate.wake_s
        burst.sleep_s = put_to_sleep(server, cfg)
        wake, back = fmt(gate.wake_s, 2), fmt(burst.sleep_s, 2)
        say(f"    (woken in {wake} s for that burst; back to sleep after it in {back} s)")


def run_concurrent_window(trial: Trial, steps: list[Step], burst: BurstMark, sink: "RecordSink") -> None:
    """Every model's requests at once, each from its own plan on its own thread, in the window `burst`."""
    pool = concurrent.futures.ThreadPoolExecutor(len(steps), thread_name_prefix="model")
    try:
        router = trial.router
        futures = [
            pool.submit(run_step, trial, s, burst.repeat, sink, router and RouterGate(router, s.server))
            for s in steps
        ]
        for future in concurrent.futures.as_completed(futures):
            if future.exception() is not None:  # the window fails: what the others sent ends within it
                trial.halt.set()
                concurrent.futures.wait(futures)
                break
        for future in futures:
            future.result()
    except KeyboardInterrupt:  # every model's thread sends no more, and what the stop cuts off is not kept
        trial.halt.set()
        sink.close()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on Ctrl-C the servers' stop ends the rest
        burst.end = time.time()


def slot_step(step: Step, slot: str) -> Step:
    """`step` as `slot` runs it: under every model's traffic at once, from that model's own plan."""
    if step.server != ALL_SLOTS:
        return step
    return dataclasses.replace(step, server=slot, plan=f"{step.plan}_{slot}")


def warm_up(trial: Trial) -> bool:
    """One discarded burst of the experiment's shape per server not yet warm for it; whether it sent any. A
    fresh GPU's first heavy burst is several times slower, whichever arm it hits, and a new shape can build
    kernels mid-burst (on an H100 a reused kvcached server's first overload burst waited 11 s for Triton to
    compile a sampling kernel, while the fresh static pair had paid it in its warm-up)."""
    cfg, sent = trial.cfg, False
    for slot, server in trial.servers.items():
        step = next((slot_step(s, slot) for s in trial.exp.steps if s.server in (slot, ALL_SLOTS)), None)
        if step is None or step.plan in server.warmed:  # paid once per process and shape
            continue
        say(f"  warm-up of {server.spec.label} ({step.plan} shape, discarded)")
        gate = WakeGate(server, cfg) if server.spec.sleep_mode else None
        plan = trial.plans[step.plan]
        if plan.arrivals != "bursts":  # open loop: the first requests of a window at once, not a whole window
            first = next((plan.burst(b) for b in range(plan.bursts) if plan.burst(b)), [])[:OPEN_LOOP_WARMUP]
            at_once = (dataclasses.replace(r, burst=step.burst, offset_s=0.0) for r in first)
            plan = dataclasses.replace(plan, requests=tuple(at_once))
        warm = dataclasses.replace(step, phase=f"warm-up {slot}")
        sink = RecordSink(trial.folder / "warmup.jsonl", keep_itl=False)
        records = run_step(trial, warm, -1, sink, gate, plan)
        fail_if_refused(server, records)
        sent = bool(records) or sent
        if gate is not None:
            put_to_sleep(server, cfg)
        server.warmed.add(step.plan)
    return sent


OPEN_LOOP_WARMUP = 64  # open loop: requests of the warm-up burst


def fail_if_refused(server: "RunningServer", records: list["RequestRecord"]) -> None:
    """Every warm-up request answered 4xx (a base model without a chat template, a wrong key): the bursts'
    requests, of the same shape, would be refused the same way, so the experiment stops here."""
    if records and all(r.status is not None and 400 <= r.status < 500 for r in records):
        raise server.failure(
            f"server {server.spec.label} refused every warm-up request ({records[0].error}), and would "
            "refuse every burst's the same way."
        )


def run_step(
    trial: Trial,
    step: Step,
    repeat: int,
    sink: Callable[["RequestRecord"], None],
    gate: Optional["WakeGate | RouterGate"] = None,
    plan: Optional["WorkloadPlan"] = None,
) -> list["RequestRecord"]:
    """One burst of `step` (from its plan unless `plan` replaces it) against its server, which must be up."""
    cfg, server, plan = trial.cfg, trial.servers[step.server], plan or trial.plans[step.plan]
    server.fail_if_dead(f"before {step.phase!r}")
    reqs = plan.burst(step.burst)
    if not reqs:  # an open-loop window can plan no arrival at a low rate
        say(f"    {step.phase}: no request planned in this window")
        return []

    def make(r: "PlannedRequest") -> "RequestRecord":
        where = (trial.exp.name, server.spec.name, step.phase, repeat)
        return RequestRecord(*where, r.burst, r.index, 0.0, planned_prompt_tokens=r.prompt_tokens)

    started = time.time() + min(r.offset_s for r in reqs)  # a staggered model's first request waits
    records = run_burst(server, reqs, make, cfg, sink=sink, gate=gate, halt=trial.halt)
    if trial.halt.is_set():
        say(f"    {step.server} {step.phase}: {len(records)} of {len(reqs)} sent, then another model failed")
        return records
    failed = sum(not r.ok for r in records)
    ttft = percentile([r.ttft_s for r in records if r.ok], 50)
    named = len(trial.servers) == 1 or step.server in step.phase.split()  # "ramp 1" is every model's
    who = "" if named else f"{step.server} "
    say(
        f"    {who}{step.phase}{f' (repeat {repeat + 1})' if cfg.repeats > 1 else ''}: {len(reqs)} requests "
        f"in {time.time() - started:.1f} s, {failed} failed, TTFT p50 "
        f"{'n/a' if ttft is None else f'{ttft:.3f} s'}"
    )
    if failed == len(records):
        first = next((r.error for r in records if r.error), "unknown")
        problem = server_problem(server)
        if problem:  # a dead server makes every later number meaningless: stop this experiment
            raise server.failure(
                f"every request of {step.phase!r} failed and server {server.spec.label} "
                f"{problem} (first error: {first})."
            )
        say(
            f"    WARNING: every request of {step.phase!r} failed; first error: {first} "
            f"(server log: {server.log_path}){kv_wait_hint(server)}"
        )
    return records


def apply_pair_budget(
    budget: int, by_slot: dict[str, "RunningServer"], restore: dict[str, int]
) -> dict[str, int]:
    """Write kvcached limits so the pair shares `budget`; remembers the old limits in `restore`."""
    segments = {}
    for slot, server in by_slot.items():
        segments[slot] = read_segment(server.spec.ipc_name)
        if segments[slot] is None:
            raise RuntimeError(
                f"kvcached segment {segment_path(server.spec.ipc_name)} not found: "
                f"is kvcached active in server {slot}? (see {server.log_path})"
            )
    limits = pair_limits(budget, segments)
    held = {k: seg["used_bytes"] + seg["prealloc_bytes"] for k, seg in segments.items()}
    for slot, limit in limits.items():
        if limit <= held[slot]:
            raise RuntimeError(
                f"--overload-budget-gib {budget / GIB:g} leaves kvcached instance {slot} no room to grow: "
                f"the pair already holds {sum(held.values()) / MIB:,.0f} "
                f"MiB of pre-allocated KV pages. Raise --overload-budget-gib."
            )
        ipc = by_slot[slot].spec.ipc_name
        restore[ipc] = segments[slot]["total_bytes"]
        write_segment_limit(ipc, limit)
        say(
            f"  kvcached limit of {slot} set to {limit / GIB:.2f} GiB "
            f"(was {segments[slot]['total_bytes'] / GIB:.1f} GiB)"
        )
    say(  # each limit leaves the others only what they hold now: the budget holds while one model bursts
        f"  each limit is the {budget / GIB:.2f} GiB budget less the KV pages the others hold now: the "
        "models burst in turn, so together they stay within it"
    )
    return limits


def sleep_call(server: "RunningServer", path: str, api_key: str, body: Optional[dict] = None) -> float:
    """POST /sleep?level=N, /wake_up, ... (within 120 s); seconds it took (ServerError if refused)."""
    start = time.perf_counter()
    try:
        with Connections() as connections:
            status, text = http_call(connections, "POST", server.url + path, 120.0, body, api_key)
    except (OSError, ValueError) as exc:
        raise ServerError(f"{path} on {server.spec.label} failed: {exc!r}") from exc
    if status != 200:
        raise ServerError(
            f"{path} on {server.spec.label} answered HTTP {status}: "
            f"{text.decode('utf-8', 'replace')[:200]} (vLLM serves it only with VLLM_SERVER_DEV_MODE=1, and "
            f"/sleep and /wake_up only with --enable-sleep-mode)"
        )
    return time.perf_counter() - start


def put_to_sleep(server: "RunningServer", cfg: "Config") -> Optional[float]:
    """Sleep a sleep-mode server that is awake; seconds it took (None if it already slept)."""
    if server.asleep:
        return None
    took = sleep_call(server, f"/sleep?level={cfg.sleep_level}", cfg.api_key)
    server.asleep = True
    return took


def wake_up(server: "RunningServer", cfg: "Config") -> float:
    """Wake a sleeping server; seconds it took."""
    took = sleep_call(server, "/wake_up", cfg.api_key)
    server.asleep = False  # it holds its pool from here on, whatever fails next
    if cfg.sleep_level == 2:  # level 2 dropped the weights: vLLM wakes without them
        took += sleep_call(server, "/collective_rpc", cfg.api_key, body={"method": "reload_weights"})
        took += sleep_call(server, "/reset_prefix_cache", cfg.api_key)
    return took


@dataclasses.dataclass
class WakeGate:
    """A burst's first request wakes a sleeping server, the others wait for that; all count it in latency."""

    server: "RunningServer"
    cfg: "Config"
    wake_s: Optional[float] = None
    error: Optional[str] = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __call__(self) -> None:
        with self.lock:
            if self.wake_s is None and self.error is None:
                try:
                    self.wake_s = wake_up(self.server, self.cfg)
                except ServerError as exc:
                    self.error = str(exc)
        if self.error:
            raise ServerError(self.error)

    def release(self) -> None:
        """A request done: the server stays awake until its burst is over."""


# %% The sleep router: sleep-mode servers under every model's traffic at once
class SleepRouter:
    """What a router does for sleep-mode servers under concurrent traffic: a request for a sleeping model
    wakes it (its latency counts the wake-up); at most `awake_at_most` models are awake, so a request for
    another one waits until an awake model has no request in flight and puts it to sleep. So that a busy
    model cannot keep its place for ever, the one awake longest then takes no new request (it drains)
    until the waiting model had its turn. A model idle for --sleep-after-idle-s goes back to sleep.
    Waking and putting to sleep go one at a time."""

    def __init__(self, servers: dict[str, "RunningServer"], cfg: "Config", awake_at_most: int):
        self.servers, self.cfg, self.awake_at_most = servers, cfg, awake_at_most
        self.cond = threading.Condition()
        self.in_flight = dict.fromkeys(servers, 0)
        self.idle_since = dict.fromkeys(servers, time.perf_counter())
        self.queue: list[tuple[float, int, str]] = []  # (since, ticket, model): requests for sleeping models
        self.tickets = itertools.count()
        self.moving: set[str] = set()  # being woken or put to sleep
        self.awake_since = dict.fromkeys(servers, 0.0)  # perf_counter
        # an awake model whose place a sleeping one waits for -> since when: no request after that goes in
        self.draining: dict[str, float] = {}
        self.log = {slot: {"wakes": [], "sleeps": [], "waits": [], "gave_up": []} for slot in servers}
        self.error: Optional[str] = None
        self.stopped = threading.Event()
        self.idler = threading.Thread(target=self.sleep_idle_ones, name="sleep-router", daemon=True)
        self.idler.start()

    def awake(self) -> list[str]:
        return [s for s, server in self.servers.items() if not server.asleep or s in self.moving]

    def idle(self) -> list[str]:
        """The awake models free to be put to sleep: nothing in flight, not on the move."""
        return [s for s in self.awake() if not self.in_flight[s] and s not in self.moving]

    def enter(self, slot: str) -> None:
        """Before a request for `slot` goes out: returns once its server is awake, counting it busy.
        Requests for sleeping models get their turns in the order they came (a ticket in the queue)."""
        started = time.perf_counter()
        ticket = (started, next(self.tickets), slot)
        try:
            while True:
                with self.cond:
                    victim = self.admit_or_pick(slot, started, ticket)
                if victim is None:
                    return
                if victim and not self.move(victim, asleep=True):  # its failure is the next round's error
                    with self.cond:
                        self.moving.discard(slot)
                    continue
                if self.move(slot, asleep=False, waker=started):
                    return
        finally:
            with self.cond, contextlib.suppress(ValueError):
                self.queue.remove(ticket)

    def admit_or_pick(self, slot: str, started: float, ticket: tuple) -> Optional[str]:
        """None: the request may go. Otherwise `slot` is to be woken, after the model returned (if
        not '') is put to sleep. Waits while neither can be (called holding the lock)."""
        while True:
            waited = time.perf_counter() - started
            if self.error or self.stopped.is_set() or waited > self.cfg.request_timeout_s:
                self.log[slot]["waits"].append(waited)  # a request that never had a turn waited too
                self.log[slot]["gave_up"].append(waited)
                self.draining.clear()  # for a request no longer waiting; the other waiters drain one again
                raise ServerError(self.error or self.gave_up_why(slot))
            awake = not self.servers[slot].asleep and slot not in self.moving
            if awake and started <= self.draining.get(slot, math.inf):
                self.admit(slot, started)
                return None
            if not awake and slot not in self.moving:
                if ticket not in self.queue:
                    bisect.insort(self.queue, ticket)
                if self.next_turn() == slot:  # the model of the oldest request waiting
                    room = len(self.awake()) < self.awake_at_most
                    # else the model idle longest makes room (None while each one is busy)
                    victim = "" if room else min(self.idle(), key=self.idle_since.get, default=None)
                    if victim is not None:
                        self.moving.update({slot, victim} - {""})
                        self.draining.clear()
                        return victim
                    self.drain_one()
            self.cond.wait(0.05)

    def next_turn(self) -> Optional[str]:
        return next((s for *_, s in self.queue if self.servers[s].asleep and s not in self.moving), None)

    def admit(self, slot: str, started: float) -> None:
        self.in_flight[slot] += 1
        self.log[slot]["waits"].append(time.perf_counter() - started)

    def gave_up_why(self, slot: str) -> str:
        if self.stopped.is_set():
            return f"the workload ended before {slot} had a turn awake"
        return (
            f"no turn awake for {slot} within {self.cfg.request_timeout_s:g} s (--request-timeout-s): the "
            "models awake had requests in flight, or were being woken, all that time; lower "
            "--gpu-memory-utilization so that more fit awake, or lower the rates"
        )

    def drain_one(self) -> None:
        """All awake models are busy: unless one drains already, the one awake longest takes no more."""
        busy = [s for s in self.awake() if s not in self.moving]
        if busy and not set(self.draining) & set(busy):
            self.draining[min(busy, key=self.awake_since.get)] = time.perf_counter()

    def move(self, slot: str, asleep: bool, waker: Optional[float] = None) -> bool:
        """Put `slot` to sleep or wake it; whether that went. The request that woke it (started at `waker`)
        is counted in under the same lock: nobody can take the model it woke before it goes out."""
        server, took = self.servers[slot], None
        try:
            took = put_to_sleep(server, self.cfg) if asleep else wake_up(server, self.cfg)
        except ServerError as exc:
            self.error = str(exc)
        with self.cond:
            self.moving.discard(slot)
            self.draining.pop(slot, None)
            self.awake_since[slot] = self.idle_since[slot] = time.perf_counter()
            if took is not None:
                self.log[slot]["sleeps" if asleep else "wakes"].append(took)
            woke = not asleep and not server.asleep and not self.stopped.is_set() and not self.error
            if woke and waker is not None:
                self.admit(slot, waker)
            self.cond.notify_all()
        return not self.error and (asleep or woke)

    def leave(self, slot: str) -> None:
        with self.cond:
            self.in_flight[slot] -= 1
            self.idle_since[slot] = time.perf_counter()
            self.cond.notify_all()

    def sleep_idle_ones(self) -> None:
        while not self.stopped.wait(0.05):
            with self.cond:
                now = time.perf_counter()
                due = [s for s in self.idle() if now - self.idle_since[s] >= self.cfg.sleep_after_idle_s]
                self.moving.update(due)
            for slot in due:
                self.move(slot, asleep=True)

    def stop(self) -> None:
        """No more requests: every model still awake goes to sleep, as after a burst, once any wake or
        sleep under way has ended."""
        self.stopped.set()
        self.idler.join()
        with self.cond:
            self.cond.wait_for(lambda: not self.moving, timeout=self.cfg.request_timeout_s)
        for slot in self.awake():
            self.move(slot, asleep=True)


@dataclasses.dataclass
class RouterGate:
    """A request's pass through the router: entered before sending, left when its stream ends."""

    router: SleepRouter
    slot: str

    def __call__(self) -> None:
        self.router.enter(self.slot)

    def release(self) -> None:
        self.router.leave(self.slot)


def awake_at_most(cfg: "Config") -> int:
    """How many sleep-mode servers fit awake at the static arm's share of the card."""
    return max(1, math.floor(STATIC_SPLIT_TOTAL / cfg.gpu_memory_utilization + 1e-9))


def router_summary(log: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Per model: how often it woke and slept, and how long its requests waited for it."""
    return {
        slot: {
            "wakes": len(times["wakes"]),
            "wake_s": Distribution.of(times["wakes"]),
            "sleeps": len(times["sleeps"]),
            "wait_s": Distribution.of(times["waits"]),
            **({"gave_up": len(times["gave_up"])} if times.get("gave_up") else {}),
        }
        for slot, times in log.items()
    }


# %% Configuration machinery: flags from the Config fields, and the values a run uses
class ConfigError(ValueError):
    """A bad flag value, reported before anything is launched."""


class StrictParser(argparse.ArgumentParser):
    """Unknown or malformed flags raise ConfigError instead of exiting (main() reports it), with the value
    after a secret-looking flag hidden: `--hf-token hf_...` is unknown, and must not be echoed."""

    def error(self, message: str):
        import difflib

        words = message.split(" ")
        unknown = words[2] if message.startswith("unrecognized arguments: ") else ""
        shown = [flag for flag in self._option_string_actions if flag != "--lane-of"]
        close = (
            difflib.get_close_matches(unknown.split("=")[0], shown, 1, 0.75)
            if unknown.startswith("-")
            else []
        )
        if close and is_secret_name(close[0][2:]):  # `--api-k VALUE`: the value is a secret all the same
            words[2:] = [unknown.split("=")[0] + (f"={REDACTED}" if "=" in unknown else ""), REDACTED]
        message = " ".join(redact_argv(words))
        if "expected one argument" in message:
            message += (
                "; a value that starts with '-' goes after '=', e.g. --extra-server-args='--enforce-eager'"
            )
        elif unknown.lower() in ("true", "false", "yes", "no"):
            message += "; a switch takes no value: e.g. --warmup or --no-warmup"
        elif unknown:
            message += f"; did you mean {close[0]}?" if close else "; see --help"
        raise ConfigError(message)


def config_from_args(argv: Optional[list[str]]) -> Optional[Config]:
    """argv (None: sys.argv, or NOTEBOOK_ARGS in a notebook) -> the resolved Config; None after --help."""
    argv = default_argv() if argv is None else argv
    for flag in ("--report", "--results-dir"):  # `--report "$RUN"` with RUN unset would start a whole run
        if f"{flag}=" in argv or any(a == flag and b == "" for a, b in zip(argv, argv[1:])):
            raise ConfigError(
                f"{flag}: empty (an unset shell variable?): give a value, or leave the flag out"
            )
    try:
        namespace = build_parser().parse_args(argv)
    except SystemExit:  # --help printed (bad flags raise ConfigError instead)
        return None
    return resolve_config(validate_config(home_expanded(Config(**vars(namespace)))))


def home_expanded(cfg: Config) -> Config:
    """'~/models/a' as a shell expands it, which it does not after '=', nor in a notebook's string: vLLM
    would take the literal '~' for a Hugging Face id, and --results-dir would make a folder named '~'."""
    paths = {
        name: os.path.expanduser(getattr(cfg, name))
        for name in ("model_a", "model_b", "results_dir", "report")
    }
    for name in ("models", "trace"):  # comma lists
        items = [os.path.expanduser(item.strip()) for item in getattr(cfg, name).split(",")]
        paths[name] = ",".join(items) if "~" in getattr(cfg, name) else getattr(cfg, name)
    return dataclasses.replace(cfg, **paths)


def default_argv() -> list[str]:
    """The flags where none are passed: NOTEBOOK_ARGS in a notebook (the kernel's argv is not ours), else the
    command line's."""
    return split_flags(NOTEBOOK_ARGS, "NOTEBOOK_ARGS") if running_in_notebook() else sys.argv[1:]


def split_flags(text: str, where: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:  # an unclosed quote
        raise ConfigError(f"{where}: {exc.args[0].lower()} in {text!r}; check its quotes") from None


def given_argv(argv: "Optional[list[str] | str]") -> list[str]:
    """main()'s flags: none given, default_argv(); in a notebook, `main("--preset smoke")` as a list's."""
    if argv is None:
        return default_argv()
    return split_flags(argv, "the flags") if isinstance(argv, str) else list(argv)


def notebook_argv() -> "list[str] | str":
    """In a notebook: `%run run_experiments.py FLAGS` runs with its FLAGS, a pasted cell with NOTEBOOK_ARGS
    (the kernel's own argv is not ours)."""
    if Path(sys.argv[0]).name == Path(globals().get("__file__") or "<cell>").name:
        return sys.argv[1:]
    print(f"notebook: NOTEBOOK_ARGS = {NOTEBOOK_ARGS!r}")
    return NOTEBOOK_ARGS  # main() splits it, and says where its quotes do not close


@functools.lru_cache(maxsize=1)
def config_help() -> dict[str, str]:
    """Each Config field's trailing comment, as its --help (none in a notebook cell), from the file's lines:
    inspect.getsource would parse the whole file to find the class, a fifth of a second at every start."""
    import inspect
    import linecache

    try:
        lines = linecache.getlines(inspect.getsourcefile(Config) or "")
    except (OSError, TypeError):  # no file: a notebook
        return {}
    start = next((i for i, line in enumerate(lines) if line.startswith("class Config")), len(lines))
    body = itertools.takewhile(lambda line: not line.strip() or line[0].isspace(), lines[start + 1 :])
    # name: type = default  # help
    fields = re.findall(r"^[ \t]*(\w+):[^#\n]*#(.*)$", "".join(body), re.MULTILINE)
    return {name: text.strip() for name, text in fields}


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(
        allow_abbrev=False,  # `--api-k X` is no --api-key: its value would be written down unredacted
        prog="run_experiments.py",
        description="Measure kvcached's elastic KV cache against vLLM's static pool.",
        epilog="experiments (--experiments takes names or numbers): "
        + ", ".join(f"{e.number} {e.name}" for e in EXPERIMENTS),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        text = config_help().get(field.name, "").replace("%", "%%")
        how = dict(action=argparse.BooleanOptionalAction)  # --warmup / --no-warmup
        if field.type != "bool":  # a string: annotations are not evaluated
            how = dict(type={"int": int, "float": float, "str": str}[field.type])
        if field.name == "max_model_len":
            how = dict(type=tokens_or_auto)
        if field.name == "lane_of":  # set by --gpus for each card's process
            text = argparse.SUPPRESS
        parser.add_argument(flag, dest=field.name, default=field.default, help=text, **how)
    return parser


def tokens_or_auto(value: str) -> int:
    """--max-model-len's value: a number of tokens, or 'auto' (AUTO_LENGTH)."""
    if value == "auto":
        return AUTO_LENGTH
    try:
        return max(int(value), 0)  # -1 is how auto is held: typed, it is no length (FIELD_CHECKS refuses 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of tokens or 'auto', not {value!r}") from None


def resolve_config(cfg: Config) -> Config:
    """The values a run uses: the preset's where flags were left open, and what follows from other flags."""
    if cfg.max_model_len == AUTO_LENGTH:
        cfg = dataclasses.replace(cfg, max_model_len=trace_model_len(cfg))
    cfg = fill_preset(cfg)
    check_overload_room(cfg)
    longest, room = request_lengths(cfg)  # the plans' prompts, beside an output mix's longest request too
    left = cfg.max_model_len - longest - PROMPT_MARGIN_TOKENS  # for the prompt, whatever it asks
    least = min(max(cfg.prompt_tokens, 1), MIN_CLIPPED_PROMPT_TOKENS)  # 0: the tutorial's short prompts
    need(
        left >= least or cfg.arrivals == "trace",
        "max_model_len",
        f"{cfg.max_model_len} leaves the prompt {left} tokens beside {longest} output tokens and "
        f"{PROMPT_MARGIN_TOKENS} of margin ({least} at least): raise it, or lower --max-tokens",
    )
    need(
        cfg.shared_prefix_tokens == 0 or cfg.shared_prefix_tokens < room,
        "shared_prefix_tokens",
        f"must be below the prompt length ({room} tokens: --prompt-tokens, within --max-model-len)",
    )
    if cfg.prompt_tokens > room and cfg.arrivals != "trace":
        say(
            f"note: prompts of --prompt-tokens {cfg.prompt_tokens} are cut to {room} tokens, what "
            f"--max-model-len {cfg.max_model_len} leaves beside {longest} output tokens and "
            f"{PROMPT_MARGIN_TOKENS} of margin"
        )
    lengths_planned = "--arrivals trace" if cfg.arrivals == "trace" else None
    if cfg.output_tokens_dist != "fixed":
        lengths_planned = f"--output-tokens-dist {cfg.output_tokens_dist}"
    if lengths_planned and not cfg.ignore_eos:
        say(
            f"note: {lengths_planned}: turning on --ignore-eos so that every response is exactly as long "
            "as planned"
        )
        cfg = dataclasses.replace(cfg, ignore_eos=True)
    if (
        cfg.sleep_level == 2
        and cfg.load_format == "dummy"
        and any(e.arm == "sleep" for e in parse_experiments(cfg.experiments))
    ):
        raise ConfigError(
            "--sleep-level 2 drops the weights while asleep and reloads them from their files on "
            "waking, which --load-format dummy has none of (vLLM answers HTTP 500): use level 1, "
            "or real weights"
        )
    if cfg.load_format == "dummy" and not cfg.ignore_eos:
        say(
            "note: --load-format dummy gives random weights whose output can end at any token; "
            "turning on --ignore-eos so every response has exactly max_tokens tokens"
        )
        cfg = dataclasses.replace(cfg, ignore_eos=True)
    return cfg


def fill_preset(cfg: Config) -> Config:
    """The preset's workload where a flag was left open: at 0, or below 0 for gap_s and prompt_tokens."""
    filled = {}
    for name, preset_value in PRESET_WORKLOADS[cfg.preset].items():
        value = getattr(cfg, name)
        left_open = value < 0 if name in ("gap_s", "prompt_tokens") else not value
        filled[name] = preset_value if left_open else value
    # a trace sends its own lengths: --max-tokens is read only by the overload experiments' plans
    need(
        filled["max_tokens"] < cfg.max_model_len // 2 or (cfg.arrivals == "trace" and not runs_overload(cfg)),
        "max_tokens",
        f"is {filled['max_tokens']} (the preset's unless given), but --max-model-len {cfg.max_model_len} "
        f"takes below {cfg.max_model_len // 2}: lower --max-tokens or raise --max-model-len",
    )
    return dataclasses.replace(cfg, **filled)


def parse_env_pairs(spec: str) -> dict[str, str]:
    pairs = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--kvcached-env: expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


# %% Configuration checks, part 1: every flag checked before anything launches, naming the flag
def need(ok: bool, flag: str, why: str) -> None:
    """A ConfigError naming the flag (Config field name) when ok is False."""
    if not ok:
        raise ConfigError(f"--{flag.replace('_', '-')}: {why}")


# samples of each series in an idle window: the device's, for a median that ignores a blip; the per-process
# ones (each server's own idle level and footprint), so that one late sample still leaves one in the window
MIN_IDLE_SAMPLES = {"sample_hz": 5, "process_sample_hz": 2}
PROMPT_MARGIN_TOKENS = 64  # of --max-model-len kept free of prompt and output: chat template, tokenizer drift
MAX_WINDOW_REQUESTS = 100_000  # planned in one window or burst: each is a thread's work and a row
MAX_WINDOWS = 10_000  # bursts or open-loop windows of one workload, and its repeats
MAX_PLANNED_REQUESTS = 1_000_000  # in one plan: each request's prompt is built before the first is sent
MAX_SECONDS, MAX_SAMPLE_HZ, MAX_BUDGET_GIB = 1e6, 1000.0, 100_000


def folder_exists_if_named(model: str) -> bool:
    """'/data/m', './m', '~/m' name folders, which must exist; 'org/name' is a Hugging Face id."""
    names_folder = model.startswith(("/", ".", "~")) or os.sep + os.sep in model
    return not names_folder or Path(model).expanduser().is_dir()


MISSING_FOLDER = (
    "{v!r} looks like a local folder but there is no such folder (a Hugging Face id looks like 'org/name')"
)


FIELD_CHECKS = (
    # (Config fields, what each one's value v must pass, the message otherwise: may show {v}), in order
    ("preset", lambda v: v in PRESETS, f"must be one of {', '.join(PRESETS)}, got {{v!r}}"),
    (  # it goes into each request's Authorization header; the message never shows it
        "api_key",
        lambda v: re.fullmatch(r"[!-~]*", v),
        "must be printable ASCII without spaces: every request would fail to send it",
    ),
    (
        "tag",
        lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v),
        "must be up to 100 letters, digits, '.', '_' or '-' (it names a folder), got {v!r}",
    ),
    ("gpu_memory_utilization", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("pair_utilization_b", lambda v: 0 <= v <= 1, "must be in [0, 1] (0 = derived)"),
    ("repeats", lambda v: 1 <= v <= MAX_WINDOWS, f"must be 1 to {MAX_WINDOWS:,}"),
    ("preimport", lambda v: v in ("auto", "on", "off"), "must be auto, on or off, got {v!r}"),
    ("engine_start", lambda v: v in ("auto", "fork", "spawn"), "must be auto, fork or spawn, got {v!r}"),
    ("sleep_level", lambda v: v in (1, 2), "must be 1 or 2 (vLLM's sleep levels), got {v}"),
    ("gpu_index temperature release_timeout_s shared_prefix_tokens", lambda v: v >= 0, "must be >= 0"),
    (
        "gpus",
        lambda v: not v or re.fullmatch(r"(\d+)(,\d+)*", v),
        "must be NVML indices separated by commas, e.g. 0,1; got {v!r}",
    ),
    ("bursts burst_size max_tokens", lambda v: v >= 0, "must be >= 0 (0 = preset's value)"),
    ("max_burst_size", lambda v: v >= 1, "must be >= 1"),
    ("bursts", lambda v: v <= MAX_WINDOWS, f"must be at most {MAX_WINDOWS:,}"),
    # seconds past 1e6 (11 days) overflow a deadline's clock arithmetic; past 1 kHz the sampler falls behind
    (
        "start_timeout_s request_timeout_s settle_s idle_window_s release_timeout_s sleep_after_idle_s "
        "duration_s gap_s stagger_s",
        lambda v: v <= MAX_SECONDS,
        f"must be at most {MAX_SECONDS:g} seconds",
    ),
    (
        "sample_hz process_sample_hz",
        lambda v: v <= MAX_SAMPLE_HZ,
        f"must be at most {MAX_SAMPLE_HZ:g} a second",
    ),
    ("overload_budget_gib", lambda v: v <= MAX_BUDGET_GIB, f"must be at most {MAX_BUDGET_GIB:,} GiB"),
    # every request of a burst is planned (a prompt each) and sent on a thread of its own
    (
        "burst_size max_burst_size",
        lambda v: v <= MAX_WINDOW_REQUESTS,
        f"must be at most {MAX_WINDOW_REQUESTS:,}",
    ),
    ("burst_kv_fraction release_tolerance", lambda v: 0 < v < 1, "must be in (0, 1)"),
    ("overload_budget_gib process_sample_hz", lambda v: v >= 0, "must be >= 0 (0 = preset's value)"),
    (
        "overload_demand",
        lambda v: 1 < v < 2,
        "must be in (1, 2): above the static share, below the pair's whole budget",
    ),
    ("sample_hz start_timeout_s request_timeout_s settle_s idle_window_s", lambda v: v > 0, "must be > 0"),
    ("model_a model_b tokenizer", folder_exists_if_named, MISSING_FOLDER),
    ("slo_ttft_ms slo_tpot_ms", lambda v: v >= 0, "must be >= 0 (0 = no such objective)"),
    ("slo_attainment", lambda v: 0 < v <= 100, "must be a percentage above 0 and at most 100"),
    (
        "arrivals",
        lambda v: v in ("bursts", "poisson", "gamma", *PER_MODEL_ARRIVALS),
        "must be bursts, poisson, gamma, ramp or trace, got {v!r}",
    ),
    (
        "max_model_len",
        lambda v: v > 0 or v == AUTO_LENGTH,
        "must be > 0 tokens, or auto (with --arrivals trace)",
    ),
    ("sleep_after_idle_s", lambda v: v > 0, "must be > 0 seconds, got {v:g}"),
    (
        "trace_speedup",
        lambda v: 1e-6 <= v <= 1e6,
        "must be 1e-06 to 1e+06 (2: twice as fast as the trace), got {v:g}",
    ),
    ("rate", lambda v: v >= 0, "must be >= 0 requests per second, got {v:g}"),
    # below 0.01 the gamma's gaps underflow to 0 and a window would never end
    ("burstiness", lambda v: v >= 0.01, "must be >= 0.01 (1 = Poisson, below 1 burstier), got {v:g}"),
    ("ramp_step", lambda v: v >= 1e-6, "must be at least 1e-06 requests/s per second, got {v:g}"),
    (
        "stagger_s",
        lambda v: v >= 0,
        "must be >= 0 seconds (0 = once the previous model has peaked), got {v:g}",
    ),
)


# Flags that only some settings read: given elsewhere (a script's common flags, say), a note says so
APPLIES_ONLY = (
    (
        "trace_window trace_speedup trace_rate_scale",
        lambda c: c.arrivals == "trace",
        "applies to --arrivals trace",
    ),
    ("ramp_step stagger_s", lambda c: c.arrivals == "ramp", "applies to --arrivals ramp"),
    ("burstiness", lambda c: c.arrivals == "gamma", "applies to --arrivals gamma"),
    (
        "duration_s",
        lambda c: c.arrivals in ("poisson", "gamma", "ramp"),
        "applies to --arrivals poisson, gamma or ramp",
    ),
    (
        "burst_size",
        lambda c: c.arrivals == "bursts",
        "applies to closed bursts (a window sends what arrives in it)",
    ),
    ("port_a port_b", lambda c: not c.port, "has no effect with --port (slot i listens on --port + i)"),
    ("model_a model_b", lambda c: not c.models, "has no effect with --models (name every model there)"),
)


def note_ignored(cfg: Config) -> None:
    given = given_flags(cfg)
    for names, applies, why in APPLIES_ONLY:
        for name in names.split():
            if name in given and not applies(cfg):
                say(f"note: --{name.replace('_', '-')} {why}: it is ignored")


def validate_config(cfg: Config) -> Config:
    """Check every flag before anything launches (raises ConfigError naming the flag); returns cfg."""
    for name, value in vars(cfg).items():  # inf/nan would crash, hang or fail every experiment
        if isinstance(value, float):
            need(math.isfinite(value), name, f"must be a finite number, got {value}")
    chosen = {e.name for e in parse_experiments(cfg.experiments)}
    check_report_alone(cfg)
    for names, passes, why in FIELD_CHECKS:
        for name in names.split():
            value = getattr(cfg, name)
            need(bool(passes(value)), name, why.format(v=value))
    for rate, least in MIN_IDLE_SAMPLES.items():
        hz = getattr(cfg, rate) or PRESET_WORKLOADS[cfg.preset][rate]
        need(
            cfg.idle_window_s * hz >= least - 1e-9,
            "idle_window_s",
            f"must hold at least {least} samples at --{rate.replace('_', '-')} {hz:g} (>= {least / hz:g} s)",
        )
    b_share_derived = not (cfg.pair_utilization_b or cfg.static_shares) and len(slots(cfg)) == 2
    need(
        cfg.gpu_memory_utilization < A_BELOW_FOR_DERIVED_B
        or not b_share_derived
        or "shared_static" not in chosen,
        "gpu_memory_utilization",
        f"leaves no room for model B in shared_static: lower it below {A_BELOW_FOR_DERIVED_B:g} "
        "(--check says how far, from model B's size), or give both shares with --static-shares A,B "
        f"(at most {MAX_STATIC_TOTAL:g} together)",
    )
    need(
        not cfg.pair_utilization_b or cfg.static_shares or len(slots(cfg)) == 2,
        "pair_utilization_b",
        f"is model B's share of a pair: for {len(slots(cfg))} models give every share in --static-shares"
        if len(slots(cfg)) > 2
        else "is model B's share of a pair, and one model has no B: leave it out",
    )
    pair_given = cfg.pair_utilization_b and not cfg.static_shares
    pair = shares_total([cfg.gpu_memory_utilization, cfg.pair_utilization_b])
    need(
        not pair_given or pair <= MAX_STATIC_TOTAL or "shared_static" not in chosen,
        "pair_utilization_b",
        f"with --gpu-memory-utilization {cfg.gpu_memory_utilization:g} the pair takes {pair:g} of the card: "
        f"at most {MAX_STATIC_TOTAL:g} together",
    )
    for check in (check_lanes, check_model_list, check_server_command, check_workload, note_ignored):
        check(cfg)
    return cfg


def given_flags(cfg: Config) -> list[str]:
    """The Config fields whose value is not the default: the flags given (or set in NOTEBOOK_ARGS)."""
    return [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default]


def check_report_alone(cfg: Config) -> None:
    """--report rebuilds a run with its own settings: another flag would change nothing, so it is refused."""
    given = [name for name in given_flags(cfg) if name not in ("report", "plots")]
    why = (
        "--report uses the run's own settings (its config.json): leave this flag out (each experiment's "
        "requests.csv has every request's ttft_s and tpot_s, to score against other SLOs)"
    )
    need(not (cfg.report and given), given[0] if given else "report", why)


def check_lanes(cfg: Config) -> None:
    """--gpus, and the ports of every lane (lane k uses --port-a/--port-b + LANE_PORT_STEP k)."""
    lanes = len(gpu_indices(cfg))
    need(len(set(gpu_indices(cfg))) == lanes, "gpus", "lists a card twice")
    need(
        not (cfg.gpus and cfg.gpu_index) or cfg.lane_of, "gpus", "give either --gpus or --gpu-index, not both"
    )
    need(
        lanes == 1 or script_file() is not None,
        "gpus",
        "runs one process per card from this script's file, and there is none here (a notebook cell): "
        "give one card (--gpu-index), or save the cell as run_experiments.py and run it from a terminal",
    )
    names = ("port",) if cfg.port else ("port_a", "port_b")
    last = names[-1]  # the flag that sets the highest port
    for name in names:
        need(
            0 < getattr(cfg, name) < 65536 - LANE_PORT_STEP * (lanes - 1),
            name,
            "must be a TCP port" + (f" (lane k of --gpus uses it + {LANE_PORT_STEP}k)" if lanes > 1 else ""),
        )
    need(cfg.port or cfg.port_a != cfg.port_b, "port_b", "must differ from --port-a")
    ports = [port_of(cfg, slot) for slot in slots(cfg)]
    need(
        max(ports) + LANE_PORT_STEP * (lanes - 1) < 65536,
        last,
        f"leaves no TCP port for model {slots(cfg)[-1]} (slot i of --models uses the first port + i)",
    )
    lane_ports = [p + LANE_PORT_STEP * k for k in range(lanes) for p in ports]
    need(
        len(set(lane_ports)) == len(lane_ports),
        last,
        f"collides with another lane's ports ({lane_ports}: lane k uses --port-a/--port-b "
        f"+ {LANE_PORT_STEP}k)"
        if lanes > 1
        else f"collides with another model's port ({ports}: models after B use --port-b + 1, + 2, ...)",
    )


def check_model_list(cfg: Config) -> None:
    models, shares = slot_models(cfg), cfg.static_shares
    for name in () if cfg.models else ("model_a", "model_b"):
        need(
            bool(getattr(cfg, name).strip()), name, "must name a model (a Hugging Face id or a local folder)"
        )
    need(0 < len(models) <= 26 and all(models), "models", f"must name 1 to 26 models, got {cfg.models!r}")
    for model in models:
        need(folder_exists_if_named(model), "models", MISSING_FOLDER.format(v=model))
    if shares:
        need(
            re.fullmatch(r"\d*\.?\d+(,\d*\.?\d+)*", shares) is not None,
            "static_shares",
            f"must be fractions separated by commas, e.g. 0.3,0.3,0.3; got {shares!r}",
        )
        values = static_shares(cfg)
        need(
            len(values) == len(models),
            "static_shares",
            f"gives {len(values)} shares for {len(models)} models",
        )
        need(all(0 < v < 1 for v in values), "static_shares", "each share must be in (0, 1)")
        total = shares_total(values)
        need(
            total <= MAX_STATIC_TOTAL,
            "static_shares",
            f"sum to {total:g}: at most {MAX_STATIC_TOTAL:g} of the card",
        )
    shared = [e.name for e in parse_experiments(cfg.experiments) if GROUPS[e.group].pair]
    need(
        len(models) > 1 or not shared,
        "models",
        f"one model cannot share the card in {', '.join(shared)}: name two or more, or run 1, 2 and 6",
    )


# %% Configuration checks, part 2: the server command, and the workload's lengths and size
# vLLM flags each server gets from the harness (the last of a repeated flag wins): the harness's own flag
SET_PER_SERVER = {
    "--model": "--models",
    "--host": "--host",
    "--port": "--port or --port-a/--port-b",
    "--max-model-len": "--max-model-len",
    "--gpu-memory-utilization": "--gpu-memory-utilization, --static-shares or --pair-utilization-b",
    "--kv-cache-memory-bytes": "--overload-budget-gib",
    "--enable-sleep-mode": "--experiments with sleep or shared_sleep",
    "--enable-prefix-caching": "--prefix-caching",
    "--no-enable-prefix-caching": "--prefix-caching",
    "--load-format": "--load-format",
    "--tokenizer": "--tokenizer",
    "--served-model-name": "--models (the client asks each server for its model by that name)",
    "--api-key": "--api-key (the client sends it too)",
}


def extra_server_flags(cfg: Config) -> list[str]:
    """Each argument of --extra-server-args without a `=value` of its own (values given apart stay too),
    spelled as vLLM reads it: `--max_model_len` is its `--max-model-len`."""
    named = (arg.partition("=")[0] for arg in shlex.split(cfg.extra_server_args))
    return ["--" + arg[2:].replace("_", "-") if arg.startswith("--") else arg for arg in named]


# what the harness sets in each server's environment itself (server_env), not --kvcached-env's to change
SET_IN_SERVER_ENV = {
    "ENABLE_KVCACHED": "--experiments (each arm sets it)",
    "KVCACHED_AUTOPATCH": "--experiments (each arm sets it)",
    "KVCACHED_IPC_NAME": "nothing: each server gets a segment name of its own",
    "VLLM_API_KEY": "--api-key",
    "CUDA_VISIBLE_DEVICES": "--gpu-index or --gpus",
    "VLLM_USE_V2_MODEL_RUNNER": "nothing: both arms run the same model runner (see the checklist)",
}


def python_script(words: list[str]) -> str:
    """The script a `python [options] script ...` command runs; '' for -m or -c, or another program."""
    if not words or not re.fullmatch(r"python[\d.]*", Path(words[0]).name):
        return ""
    options = iter(words[1:])
    for word in options:
        if word.startswith(("-m", "-c")):  # a module or a string: what follows are its arguments
            return ""
        if word in ("-W", "-X"):  # the two options whose value is a word of its own
            next(options, None)
        elif not word.startswith("-"):
            return word
    return ""


def check_server_command(cfg: Config) -> None:
    for name in ("server_cmd", "extra_server_args"):
        try:
            shlex.split(getattr(cfg, name))
        except ValueError as exc:  # e.g. "No closing quotation"
            need(False, name, f"cannot be split into arguments ({exc}): check its quotes")
    program = (shlex.split(cfg.server_cmd) or [""])[0]
    script = python_script(shlex.split(cfg.server_cmd))
    need(
        not script or Path(script).is_file(),
        "server_cmd",
        f"runs {script}, which is not a file: the server would exit at once",
    )
    shell_env = "=" in program and "/" not in program.partition("=")[0]  # `HF_TOKEN=x vllm serve`
    need(
        not cfg.server_cmd or shutil.which(program) is not None,
        "server_cmd",
        f"{redact_argv([program])[0]} is not found (no executable file, nor a command on PATH)"
        + ("; NAME=value before a command is shell syntax: put it in the environment" if shell_env else ""),
    )
    ours = [flag for flag in extra_server_flags(cfg) if flag in SET_PER_SERVER]
    need(
        not ours,
        "extra_server_args",
        f"sets {ours[0] if ours else ''}, which the harness sets for each server (and each arm) itself: "
        f"use {SET_PER_SERVER[ours[0]] if ours else ''}",
    )
    need(
        cfg.preimport != "on" or staged_command(server_prefix(cfg)) is not None,
        "preimport",
        "on needs a server command of the form `python -m MODULE` (see --server-cmd)",
    )
    theirs = [name for name in parse_env_pairs(cfg.kvcached_env) if name in SET_IN_SERVER_ENV]
    need(
        not theirs,
        "kvcached_env",
        f"sets {theirs[0] if theirs else ''}, which the harness sets for each server itself: "
        f"use {SET_IN_SERVER_ENV[theirs[0]] if theirs else ''}",
    )
    check_kvcached_utilization(cfg)


def check_kvcached_utilization(cfg: Config) -> None:
    """kvcached reads KVCACHED_GPU_UTILIZATION as the share of the card it may map: a number in (0, 1]."""
    given = parse_env_pairs(cfg.kvcached_env)
    value = given.get("KVCACHED_GPU_UTILIZATION", os.environ.get("KVCACHED_GPU_UTILIZATION"))
    if value is None:
        return
    where = "" if "KVCACHED_GPU_UTILIZATION" in given else " in the shell's environment"
    try:
        ok = 0 < float(value) <= 1  # nan is neither
    except ValueError:
        ok = False
    need(ok, "kvcached_env", f"KVCACHED_GPU_UTILIZATION{where} must be a number in (0, 1], got {value!r}")


def runs_overload(cfg: Config) -> bool:
    return any(e.name.startswith("overload") for e in parse_experiments(cfg.experiments))


def check_overload_room(cfg: Config) -> None:
    """The overload experiments send long requests: --max-model-len must leave them a prompt, and the
    shared prefix must fit in it."""
    if not runs_overload(cfg):
        return
    least = next(n for n in itertools.count(1) if overload_lengths(cfg, n)[1] >= OVERLOAD_LEAST_PROMPT)
    need(
        cfg.max_model_len >= least,
        "max_model_len",
        f"{cfg.max_model_len} leaves the overload experiments' long requests no prompt: give {least} or "
        "more, or leave overload_kvcached and overload_static out of --experiments",
    )
    fixed = dataclasses.replace(cfg, output_tokens_dist="fixed")  # as overload_plan sends them
    _, room = request_lengths(fixed, *overload_lengths(cfg, cfg.max_model_len))
    need(
        cfg.shared_prefix_tokens < room,
        "shared_prefix_tokens",
        f"must be below the overload experiments' prompt length ({room} tokens within --max-model-len "
        f"{cfg.max_model_len}): lower it, or leave overload_kvcached and overload_static out of "
        "--experiments",
    )


def check_workload(cfg: Config) -> None:
    lengths = parse_output_lengths(cfg.output_tokens_dist, cfg.max_tokens)
    fits = lengths.hi + PROMPT_MARGIN_TOKENS < cfg.max_model_len or cfg.max_model_len == AUTO_LENGTH
    mixed = cfg.output_tokens_dist != "fixed"  # else the output is --max-tokens, checked with the preset
    too_short = (
        f"{cfg.max_model_len} tokens hold no request beside the {PROMPT_MARGIN_TOKENS} kept free: raise it"
    )
    need(fits or mixed, "max_model_len", too_short)
    need(
        fits,
        "output_tokens_dist",
        f"asks for up to {lengths.hi:g} output tokens; --max-model-len {cfg.max_model_len} leaves no room "
        f"for the prompt",
    )
    if cfg.shared_prefix_tokens:
        need(cfg.arrivals != "trace", "shared_prefix_tokens", "a trace's prompts take none: leave it out")
        need(
            cfg.prefix_caching,
            "shared_prefix_tokens",
            "shares a prefix for vLLM to cache: add --prefix-caching",
        )
    need(cfg.arrivals == "ramp" or not cfg.peak_rates, "peak_rates", "apply to --arrivals ramp")
    need(cfg.arrivals == "trace" or not cfg.trace, "trace", "applies to --arrivals trace")
    need(
        cfg.max_model_len != AUTO_LENGTH or cfg.arrivals == "trace",
        "max_model_len",
        "auto needs --arrivals trace",
    )
    need(
        cfg.arrivals in ("poisson", "gamma") or not cfg.rates_per_model,
        "rates_per_model",
        "apply to poisson or gamma arrivals",
    )
    if cfg.arrivals == "bursts":
        need(
            not cfg.rates and not cfg.rate,
            "arrivals",
            "--rate/--rates apply to open-loop arrivals: add --arrivals poisson",
        )
        most = cfg.bursts * (cfg.burst_size or cfg.max_burst_size)  # an auto burst is at most the cap
        need(
            most <= MAX_PLANNED_REQUESTS,
            "bursts",
            f"x --burst-size plans up to {most:,} requests: at most {MAX_PLANNED_REQUESTS:,}",
        )
        return
    if cfg.arrivals in PER_MODEL_ARRIVALS:
        return check_ramp(cfg) if cfg.arrivals == "ramp" else check_trace(cfg)
    check_open_loop(cfg)


def check_open_loop(cfg: Config) -> None:
    """Poisson or gamma arrivals: a rate for each window (or each model), and windows small enough to plan."""
    need(cfg.duration_s > 0, "duration_s", "must be > 0 seconds of arrivals per window")
    if cfg.rates_per_model:
        need(
            not cfg.rates and not cfg.rate,
            "rates_per_model",
            "give either each model's rate or --rate/--rates",
        )
        planned = parse_rates_per_model(cfg)
    else:
        planned = parse_rates(cfg)
        need(
            bool(cfg.rates) or cfg.rate > 0,
            "rate",
            f"--arrivals {cfg.arrivals} needs --rate R, --rates R1,R2,... or --rates-per-model",
        )
    most = max(planned) * cfg.duration_s
    need(
        most <= MAX_WINDOW_REQUESTS,
        "duration_s",
        f"with a rate of {max(planned):g} requests/s plans about {most:,.0f} requests a window: at most "
        f"{MAX_WINDOW_REQUESTS:,} (a lower rate or a shorter --duration-s)",
    )
    need(len(planned) <= MAX_WINDOWS, "rates", f"at most {MAX_WINDOWS:,} windows, got {len(planned):,}")
    windows_each = max(cfg.bursts, 1) if cfg.rates_per_model else 1  # each model's rate, in every window
    total = math.fsum(planned) * cfg.duration_s * windows_each
    need(
        total <= MAX_PLANNED_REQUESTS,
        "duration_s",
        f"plans about {total:,.0f} requests over the windows: at most {MAX_PLANNED_REQUESTS:,} (fewer "
        "windows, lower rates or a shorter --duration-s)",
    )


def check_ramp(cfg: Config) -> None:
    need(not cfg.rates and not cfg.rate, "arrivals", "ramp takes --peak-rates; leave out --rate/--rates")
    peaks = parse_peaks(cfg)
    models = len(served_slots(cfg, parse_experiments(cfg.experiments)))  # experiments 1 and 2: A's ramp alone
    longest = max(ramp_length(cfg, peak, models) for peak in peaks)
    need(
        max(peaks) * ramp_length(cfg, max(peaks), 1) / 2 <= MAX_WINDOW_REQUESTS,  # about a ramp's requests
        "peak_rates",
        f"ramps to {max(peaks):g} requests/s in steps of {cfg.ramp_step:g}: more than "
        f"{MAX_WINDOW_REQUESTS:,} requests in one model's window; lower --peak-rates",
    )
    need(
        longest <= cfg.duration_s,
        "duration_s",
        f"is {cfg.duration_s:g} s, but the ramp of {models} model(s) to {max(peaks):g} "
        f"requests/s in steps of {cfg.ramp_step:g} lasts {longest:g} s: raise --duration-s to "
        f"{math.ceil(longest)}, or lower --peak-rates, raise --ramp-step, or shorten --stagger-s",
    )


# %% Model facts: KV bytes per token, read without torch or the network when possible
QWEN2_5_COMMON = dict(
    torch_dtype="bfloat16", vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768
)
KNOWN_MODEL_CONFIGS = {  # offline fallbacks for the defaults, from the models' config.json
    f"Qwen/Qwen2.5-{size}-Instruct": dict(
        QWEN2_5_COMMON,
        num_hidden_layers=layers,
        num_key_value_heads=2,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=mlp,
    )
    for size, layers, hidden, heads, mlp in (("0.5B", 24, 896, 14, 4864), ("1.5B", 28, 1536, 12, 8960))
}
# vLLM serves a float32 checkpoint at 16 bits (--dtype auto): its weights and KV take 2 bytes per value too
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 2, "float8": 1}
# Architectures whose MLP is two matrices (up, down), not three (gate, up, down)
UNGATED_MLP_TYPES = {"phi", "gpt_neox", "starcoder2", "persimmon", "nemotron"}


def load_model_config(model: str) -> tuple[Optional[dict], str]:
    """(config.json as a dict, where it came from). Local folder, then known table, then the hub."""
    local = Path(model).expanduser() / "config.json"
    if local.is_file():
        config, problem = read_json(local)
        if not isinstance(config, dict):
            what = problem or "config.json holds no JSON object"
            raise ConfigError(
                f"model {model}: {what}, in {local}: fix or replace it, or name another model "
                "(--model-a, --model-b or --models)"
            )
        return config, str(local)
    if model in KNOWN_MODEL_CONFIGS:
        return dict(KNOWN_MODEL_CONFIGS[model]), "built-in table"
    path, _ = hub_config(model)
    if path is not None:
        return json.loads(Path(path).read_text()), f"hub: {model}"
    return None, "unavailable"


def hub_config(model: str, timeout_s: float = 10.0) -> tuple[Optional[str], str]:
    """(local path of the model's config.json, '') or (None, why not)."""
    return hub_file(model, "config.json", timeout_s)


@functools.lru_cache(maxsize=None)  # the preflight and the workload sizing ask the hub once, not twice
def hub_file(model: str, name: str, timeout_s: float = 10.0) -> tuple[Optional[str], str]:
    """(local path of one of the model's files, '') or (None, why not). huggingface_hub (installed with
    vLLM) honours HF_TOKEN for gated models, HF_ENDPOINT for mirrors, its cache and HF_HUB_OFFLINE=1."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None, "huggingface_hub is not installed (it comes with vLLM)"
    try:
        return hf_hub_download(model, name, etag_timeout=timeout_s), ""
    except Exception as exc:  # gated, missing, offline, unreachable: the message says which
        return None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # beside tokenizer_config.json's key
ABSENT_ON_HUB = ("EntryNotFoundError", "RemoteEntryNotFoundError")  # not LocalEntryNotFoundError (offline)


def model_file(model: str, name: str) -> "Path | bool | None":
    """One of a model's files, from its folder or the hub: its path, False where it has none, None where
    that cannot be told here (offline, gated, unreachable)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else False
    path, why = hub_file(model, name)
    if path:
        return Path(path)
    return False if why.split(":")[0] in ABSENT_ON_HUB else None


def has_chat_template(model: str) -> Optional[bool]:
    """Whether the model's tokenizer brings a chat template, which vLLM needs for the chat completions the
    harness sends (it answers 400 without one); None where its files cannot be read here."""
    tokenizer = model_file(model, "tokenizer_config.json")
    if not tokenizer:  # no tokenizer beside the model (vLLM may be told another), or not known
        return None
    config, _ = read_json(tokenizer)
    if not isinstance(config, dict):
        return None
    if config.get("chat_template"):
        return True
    beside = [model_file(model, name) for name in CHAT_TEMPLATE_FILES]
    return True if any(beside) else (False if all(f is False for f in beside) else None)


def text_config(model_config: dict) -> dict:
    """The language model's part of a config.json: multimodal configs nest it under text_config, where
    transformers leaves out each value equal to its class's default (Gemma 3's head_dim of 256)."""
    text = model_config.get("text_config", model_config)
    return {**TEXT_DEFAULTS.get(text.get("model_type"), {}), **text} if isinstance(text, dict) else text


TEXT_DEFAULTS = {  # transformers' Gemma3TextConfig: none of these is derived from the others
    "gemma3_text": dict(
        head_dim=256,
        num_attention_heads=8,
        num_key_value_heads=4,
        hidden_size=2304,
        num_hidden_layers=26,
        max_position_embeddings=131072,
    )
}


def served_bytes_per_value(text: dict) -> int:
    """Bytes per weight or KV value as vLLM serves the model (16 bits unless config.json says less)."""
    return DTYPE_BYTES.get(str(text.get("torch_dtype", "bfloat16")), 2)


def kv_bytes_per_token(model_config: dict) -> Optional[int]:
    """K and V, every layer: 2 x layers x KV heads x head dim x dtype bytes; with multi-head latent attention
    (DeepSeek's kv_lora_rank) one compressed latent and its rotary part per layer. None where config.json
    names its sizes otherwise (GPT-2's n_layer, n_head)."""
    text = text_config(model_config)
    dtype_bytes = served_bytes_per_value(text)
    if any(key not in text for key in ("num_hidden_layers", "num_attention_heads", "hidden_size")):
        return None
    if text.get("kv_lora_rank"):
        return (
            text["num_hidden_layers"] * (text["kv_lora_rank"] + text.get("qk_rope_head_dim", 0)) * dtype_bytes
        )
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    # Falcon names its KV heads num_kv_heads, or has one (multi_query) where it names none
    kv_heads = (
        text.get("num_key_value_heads")
        or text.get("num_kv_heads")
        or (1 if text.get("multi_query") else heads)
    )
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def weight_bytes(model_config: dict) -> Optional[int]:
    """About the bytes of a dense model's weights, from config.json; None if it lacks sizes or has experts."""
    text = text_config(model_config)
    sizes = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")
    # a size given as null (Phi's num_key_value_heads) is transformers' default; a null width is unknown
    if any(not isinstance(text.get(k), int) for k in sizes) or any("expert" in k for k in text):
        return None
    hidden, layers, vocab, mlp_width, heads = (text[k] for k in sizes)
    head_dim = text.get("head_dim") or hidden // heads
    attention = hidden * head_dim * 2 * (heads + (text.get("num_key_value_heads") or heads))  # q, o; k, v
    # a config.json leaves the key out when it holds transformers' default: tied
    tied = text.get("tie_word_embeddings", model_config.get("tie_word_embeddings", True))
    mlp_matrices = 2 if text.get("model_type", model_config.get("model_type")) in UNGATED_MLP_TYPES else 3
    params = layers * (attention + mlp_matrices * hidden * mlp_width) + vocab * hidden * (1 if tied else 2)
    return params * served_bytes_per_value(text)


# %% Workload plan: built from a seed before sending, saved, identical for every arm
SEED_PROMPTS = (
    "Explain quantum entanglement to a curious 10-year-old.",
    "Write a Python function that detects cycles in a linked list.",
    "Summarize the plot of Hamlet in one paragraph.",
    "List 5 surprising household uses for baking soda with explanations.",
    "Compose a vivid haiku about rainy Monday mornings.",
    "Describe the Fermi paradox and three plausible resolutions.",
    "Translate 'knowledge is power' into French, German, and Japanese.",
    "Explain the difference between TCP and UDP with real examples.",
)
FILLER_WORDS = (
    "system memory cache model token latency river mountain quiet garden window "
    "history science music engine signal careful bright simple number market"
).split()


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    burst: int
    index: int
    prompt: str
    max_tokens: int
    temperature: float
    offset_s: float = 0.0  # open loop: when it arrives, from the start of its window
    trace_row: Optional[int] = None  # trace: the request of the file it replays (0 = the first)
    prompt_tokens: Optional[int] = None  # trace: the prompt tokens planned, template included
    clipped: bool = False  # trace: shortened to fit --max-model-len


@dataclasses.dataclass(frozen=True)
class WorkloadPlan:
    bursts: int
    burst_size: int
    gap_s: float
    max_tokens: int
    prompt_tokens: int
    temperature: float
    seed: int
    sizing: str  # how burst_size was chosen, in words
    requests: tuple[PlannedRequest, ...]
    arrivals: str = "bursts"  # or 'poisson' / 'gamma': requests arrive at their offset_s
    rates: tuple[float, ...] = ()  # open loop: requests per second of each window

    def burst(self, b: int) -> list[PlannedRequest]:
        return [r for r in self.requests if r.burst == b]

    @classmethod
    def of(cls, cfg: Config, requests_: list[PlannedRequest], windows: int, **fields) -> WorkloadPlan:
        """A plan at cfg's gap, temperature and seed; its burst_size is the busiest window's, its lengths
        (unless given) the longest planned."""
        busiest = max(collections.Counter(r.burst for r in requests_).values(), default=0)
        fields.setdefault("max_tokens", max((r.max_tokens for r in requests_), default=0))
        fields.setdefault("prompt_tokens", max((r.prompt_tokens or 0 for r in requests_), default=0))
        fields.update(bursts=windows, burst_size=busiest, requests=tuple(requests_))
        return cls(gap_s=cfg.gap_s, temperature=cfg.temperature, seed=cfg.seed, **fields)


CHAT_TEMPLATE_TOKENS = 30  # role markers and system prompt the server's chat template adds


def make_prompt(rng: random.Random, index: int, prompt_tokens: int) -> str:
    """A seed prompt padded with common words (one token each in BPE vocabularies) to ~prompt_tokens."""
    base = SEED_PROMPTS[index % len(SEED_PROMPTS)]
    if prompt_tokens <= 0:
        return base
    words = max(0, prompt_tokens - CHAT_TEMPLATE_TOKENS - 2 * len(base.split()))
    # random words also defeat any prefix sharing between requests
    filler = " ".join(rng.choices(FILLER_WORDS, k=words))
    return f"Context: {filler}\n\nTask: {base}"


def size_burst(
    kv_per_token: Optional[int],
    free_bytes: Optional[int],
    prompt_tokens: int,
    max_tokens: int,
    fraction: float,
    cap: int,
) -> tuple[int, str]:
    """Concurrent requests so that one burst's KV demand is `fraction` of the card's free memory."""
    if not kv_per_token or not free_bytes:
        return 32, "model config or free memory unknown: fell back to 32 requests a burst (set --burst-size)"
    per_request = (prompt_tokens + max_tokens) * kv_per_token
    wanted = fraction * free_bytes / per_request
    size = max(1, min(cap, int(wanted)))
    why = (
        f"{size} concurrent requests x ({prompt_tokens} prompt + {max_tokens} output tokens) x "
        f"{kv_per_token} KV bytes/token = {size * per_request / GIB:.2f} GiB per burst, "
        f"{fraction:.0%} of {free_bytes / GIB:.1f} GiB free"
    )
    if size == cap and wanted > cap:
        why += f" would need {int(wanted)}; capped at --max-burst-size {cap}"
    return size, why


@dataclasses.dataclass(frozen=True)
class OutputLengths:
    """Tokens each request asks for: 'fixed', 'uniform' (lo-hi) or 'lognormal' (mean, sigma of the log), in
    [1, max_tokens]. Requests that end at different times are where kvcached's freed pages leave fragments."""

    kind: str
    lo: float = 0
    hi: float = 0
    mean: float = 0
    sigma: float = 0

    def draw(self, rng: random.Random, max_tokens: int) -> int:
        if self.kind == "uniform":
            return rng.randint(int(self.lo), int(self.hi))
        if self.kind == "lognormal":
            mu = math.log(self.mean) - self.sigma**2 / 2  # so that the lengths average `mean`
            return max(1, min(max_tokens, round(rng.lognormvariate(mu, self.sigma))))
        return max_tokens


def parse_output_lengths(spec: str, max_tokens: int) -> OutputLengths:
    """'fixed', 'uniform:LO-HI' or 'lognormal:MEAN,SIGMA' (raises ConfigError naming the flag)."""
    kind, _, args = spec.partition(":")
    with contextlib.suppress(ValueError):  # not numbers: the error below
        if kind == "fixed" and not args:
            return OutputLengths("fixed")
        if kind == "uniform":
            lo, hi = (int(v) for v in args.split("-"))
            if 1 <= lo <= hi:
                return OutputLengths("uniform", lo=lo, hi=hi)
        if kind == "lognormal":
            mean, sigma = (float(v) for v in args.split(","))
            if mean >= 1 and 0 < sigma <= 3 and math.isfinite(mean) and math.isfinite(sigma):
                return OutputLengths("lognormal", mean=mean, sigma=sigma)
    raise ConfigError(
        f"--output-tokens-dist: {spec!r} is not one of fixed, uniform:LO-HI (1 <= LO <= HI) "
        f"or lognormal:MEAN,SIGMA (MEAN >= 1 tokens, 0 < SIGMA <= 3)"
    )


def request_lengths(
    cfg: Config, max_tokens: Optional[int] = None, prompt_tokens: Optional[int] = None
) -> tuple[int, int]:
    """The longest output a request may ask for, and its whole prompt (shared prefix included), cut to
    leave that output room in --max-model-len; by default cfg's lengths."""
    mix = parse_output_lengths(cfg.output_tokens_dist, cfg.max_tokens)
    longest = max(max_tokens or cfg.max_tokens, int(mix.hi))
    asked = cfg.prompt_tokens if prompt_tokens is None else prompt_tokens
    return longest, min(asked, cfg.max_model_len - longest - PROMPT_MARGIN_TOKENS)


def requests_plan(cfg: Config, windows: list[list[float]], sizing: str, **fields) -> WorkloadPlan:
    """A request per arrival (offsets in seconds) of each window. Prompts and output lengths come from
    seeded generators of their own: a length mix or a shared prefix leaves a seed's prompts as they were."""
    lengths = parse_output_lengths(cfg.output_tokens_dist, cfg.max_tokens)
    max_tokens, prompt_tokens = request_lengths(cfg, fields.get("max_tokens"), fields.get("prompt_tokens"))
    # the prefix every request shares: --shared-prefix-tokens words
    shared = random.Random(f"{cfg.seed}-shared-prefix").choices(FILLER_WORDS, k=cfg.shared_prefix_tokens)
    prefix = "Shared: " + " ".join(shared) + "\n\n" if cfg.shared_prefix_tokens else ""
    prompt_rng, lengths_rng = random.Random(cfg.seed), random.Random(f"{cfg.seed}-output-lengths")
    planned = []
    for window, offsets in enumerate(windows):
        for i, offset_s in enumerate(offsets):
            prompt = prefix + make_prompt(prompt_rng, len(planned), prompt_tokens - cfg.shared_prefix_tokens)
            length = lengths.draw(lengths_rng, max_tokens)
            planned.append(PlannedRequest(window, i, prompt, length, cfg.temperature, round(offset_s, 6)))
    fields.update(max_tokens=max_tokens, prompt_tokens=prompt_tokens, sizing=sizing)
    return WorkloadPlan.of(cfg, planned, len(windows), **fields)


def plan_workload(
    cfg: Config,
    burst_size: int,
    sizing: str,
    bursts: Optional[int] = None,
    max_tokens: Optional[int] = None,
    prompt_tokens: Optional[int] = None,
) -> WorkloadPlan:
    windows = [[0.0] * burst_size] * (bursts or cfg.bursts)  # a burst's requests are sent at once
    return requests_plan(cfg, windows, sizing, max_tokens=max_tokens, prompt_tokens=prompt_tokens)


def number_list(cfg: Config, flag: str, ok: Callable[[float], bool], why: str) -> list[float]:
    """A flag's comma-separated numbers (empty entries skipped), each passing `ok`, else a ConfigError."""
    text = getattr(cfg, flag)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    need(bool(values) and all(math.isfinite(v) and ok(v) for v in values), flag, f"{why}; got {text!r}")
    return values


def parse_rates(cfg: Config) -> list[float]:
    """The open-loop rate of each window: --rates, else --rate for each of --bursts windows."""
    if cfg.rates:
        why = "must be positive requests per second separated by commas, e.g. 2,4,8"
        return number_list(cfg, "rates", lambda r: r > 0, why)
    return [cfg.rate] * max(cfg.bursts, 1)


def parse_rates_per_model(cfg: Config) -> list[float]:
    why = f"must be one positive rate per model ({len(slots(cfg))}), separated by commas"
    rates = number_list(cfg, "rates_per_model", lambda r: r > 0, why)
    need(len(rates) == len(slots(cfg)), "rates_per_model", f"{why}; got {cfg.rates_per_model!r}")
    return rates


def per_model_family(cfg: Config) -> Optional[str]:
    """'ramp', 'trace' or 'open' (--rates-per-model) when each model sends its own plan at once, else None."""
    if cfg.arrivals in PER_MODEL_ARRIVALS:
        return cfg.arrivals
    return "open" if cfg.rates_per_model and cfg.arrivals in ("poisson", "gamma") else None


def arrival_offsets(rng: random.Random, rate: float, shape: float, duration_s: float) -> Iterator[float]:
    """Seconds from a window's start: gaps drawn from a gamma distribution of this shape (1 = Poisson)."""
    t = rng.gammavariate(shape, 1 / (rate * shape))
    while t < duration_s:
        yield t
        t += rng.gammavariate(shape, 1 / (rate * shape))


def parse_peaks(cfg: Config) -> list[float]:
    why = "must be peak requests per second of 1 to 1e+06, separated by commas, e.g. 12,16,20"
    return number_list(cfg, "peak_rates", lambda p: 1 <= p <= 1e6, why)


def ramp_seconds(peak: float, step: float) -> list[float]:
    """One model's rate in each second of its ramp: up by `step` a second to `peak`, then back to 1."""
    up = [min(peak, step * k) for k in range(1, math.ceil(peak / step) + 1)]
    down = [max(1.0, peak - step * k) for k in range(1, math.ceil((peak - 1) / step) + 1)]
    return up + down


def ramp_offsets(rates: list[float], start_s: float) -> list[float]:
    """Arrivals evenly spaced within each second at that second's rate (a fraction carried over)."""
    offsets, carried = [], 0.0
    for second, rate in enumerate(rates):
        n = math.floor(carried + rate) - math.floor(carried)
        carried += rate
        offsets += [start_s + second + (i + 0.5) / n for i in range(n)]
    return offsets


def stagger(cfg: Config, peak: float) -> float:
    """Seconds between two models' ramps: --stagger-s, or once the previous model has peaked."""
    return cfg.stagger_s or float(math.ceil(peak / cfg.ramp_step))


def ramp_length(cfg: Config, peak: float, models: int) -> float:
    """Seconds from the first model's ramp start to the last one's end (counted, not listed: a ramp may be
    too long to list before it is refused)."""
    up, down = math.ceil(peak / cfg.ramp_step), math.ceil((peak - 1) / cfg.ramp_step)
    return (models - 1) * stagger(cfg, peak) + up + max(down, 0)


def ramp_plan(cfg: Config, position: int, sizing: str) -> WorkloadPlan:
    """The model at `position` (A = 0): one window per peak of --peak-rates, its ramp starting
    position x the stagger into the window."""
    peaks = parse_peaks(cfg)
    ramps = [ramp_offsets(ramp_seconds(peak, cfg.ramp_step), position * stagger(cfg, peak)) for peak in peaks]
    return requests_plan(cfg, ramps, sizing, arrivals="ramp", rates=tuple(peaks))


def open_loop_plan(cfg: Config, sizing: str, position: Optional[int] = None) -> WorkloadPlan:
    """Arrivals planned before sending at each window's rate, for duration_s seconds per window (gamma
    arrivals: shape = burstiness). With a `position` (A = 0): that model's --rates-per-model rate in each
    of --bursts windows, from arrivals of its own."""
    arrivals_rng = random.Random(f"{cfg.seed}-arrivals" + (f"-{position}" if position else ""))
    shape = cfg.burstiness if cfg.arrivals == "gamma" else 1.0
    rates = (
        parse_rates(cfg) if position is None else [parse_rates_per_model(cfg)[position]] * max(cfg.bursts, 1)
    )
    windows = [list(arrival_offsets(arrivals_rng, rate, shape, cfg.duration_s)) for rate in rates]
    return requests_plan(cfg, windows, sizing, arrivals=cfg.arrivals, rates=tuple(rates))


OVERLOAD_LEAST_PROMPT = 64  # tokens: below it the overload bursts are no longer long requests


def overload_lengths(cfg: Config, max_model_len: int) -> tuple[int, int]:
    """(output, prompt) tokens of each overload request: long ones, with 256 tokens more of room for
    tokenizer drift."""
    max_tokens = min(2 * cfg.max_tokens, max_model_len // 4)
    return max_tokens, max_model_len - max_tokens - PROMPT_MARGIN_TOKENS - 256


OVERLOAD_FALLBACK_KV = 12288  # bytes of KV per token (Qwen2.5-0.5B's) for a model whose config is unread


def unknown_kv_warning(key: str) -> str:
    return (
        f"WARNING: model {key}'s KV bytes per token are unknown (its config.json could not be read), so "
        f"the overload burst was sized for {OVERLOAD_FALLBACK_KV} B (Qwen2.5-0.5B's) and may be far off: "
        "give a local model folder, or let the Hugging Face hub be reached"
    )


def overload_plan(cfg: Config, kv_known: Optional[int], budget_bytes: int, key: str) -> WorkloadPlan:
    """One heavy burst (long prompts and outputs) needing overload_demand x a model's share of the budget."""
    share = budget_bytes / len(slots(cfg))
    whose = "the pair's" if len(slots(cfg)) == 2 else "the models'"
    max_tokens, prompt_tokens = overload_lengths(cfg, cfg.max_model_len)
    kv_per_token = kv_known or OVERLOAD_FALLBACK_KV
    per_request = (prompt_tokens + max_tokens) * kv_per_token
    wanted = math.ceil(cfg.overload_demand * share / per_request)
    size = max(2, min(wanted, cfg.max_burst_size))
    demand = size * per_request  # what is sent: two requests at least, which may ask for more than wanted
    sizing = (
        f"{size} requests x ({prompt_tokens} + {max_tokens}) tokens x {kv_per_token} B = "
        f"{demand / GIB:.2f} GiB: {demand / share:.1f}x the static share ({share / GIB:.2f} GiB), "
        f"{'below' if demand < budget_bytes else 'above'} {whose} budget ({budget_bytes / GIB:.2f} GiB)"
    )
    if size < wanted:
        sizing += (
            f"; WARNING: capped at --max-burst-size {cfg.max_burst_size}, {wanted} needed: "
            f"raise it or lower --overload-budget-gib"
        )
    elif demand >= budget_bytes:
        sizing += (
            "; WARNING: two requests of these lengths already fill the budget, so neither arm can hold the "
            "burst: raise --overload-budget-gib or lower --max-model-len"
        )
    if not kv_known:
        sizing += f"; {unknown_kv_warning(key)}"
    fixed = dataclasses.replace(cfg, output_tokens_dist="fixed")  # a length mix would send less than sized
    return plan_workload(fixed, size, sizing, bursts=1, max_tokens=max_tokens, prompt_tokens=prompt_tokens)


def say_workload(cfg: Config, plans: dict[str, WorkloadPlan], sent: list[str]) -> None:
    """The workload in one line: its windows or bursts, the busiest (every model sent at once counted
    together) and its lengths."""
    main = plans["main"]  # its burst_size: the --burst-size or sized one, or open loop the busiest window
    every = [r for key in sent for r in plans[key].requests]
    longest = {
        field: max(getattr(plans[key], field) for key in sent) for field in ("prompt_tokens", "max_tokens")
    }
    card = WorkloadPlan.of(cfg, every, main.bursts, sizing=main.sizing, **longest) if len(sent) > 1 else main
    output = cfg.max_tokens if cfg.output_tokens_dist == "fixed" else cfg.output_tokens_dist
    prompt = f"~{card.prompt_tokens}" if card.prompt_tokens else "the tutorial's"
    lengths = f"{prompt} prompt + {output} output tokens"
    if cfg.arrivals == "trace":
        lengths = f"the trace's lengths, up to {card.prompt_tokens} prompt + {card.max_tokens} output tokens"
    busiest = "requests (busiest" + (f", {len(sent)} models together)" if len(sent) > 1 else ")")
    say(
        f"workload: {main.bursts} {'windows' if cfg.arrivals != 'bursts' else 'bursts'} x {card.burst_size} "
        f"{busiest if cfg.arrivals != 'bursts' else 'concurrent requests'}, {lengths}, {cfg.gap_s:g} s gaps"
    )


# %% Trace replay: a production trace's arrivals and lengths, one file per model, as a plan
PER_MODEL_ARRIVALS = ("ramp", "trace")  # every model on its own plan, all at once
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
TRACE_FORMATS = (
    "an Azure LLM inference CSV with the columns TIMESTAMP,ContextTokens,GeneratedTokens, or Mooncake-style "
    "JSONL with timestamp (ms), input_length, output_length and optional hash_ids on each line"
)
TRACE_BLOCK_TOKENS = 512  # tokens of one Mooncake hash_ids block
MIN_CLIPPED_PROMPT_TOKENS = 64  # a clipped request keeps at least this much prompt


@dataclasses.dataclass(frozen=True)
class TraceRow:
    row: int  # its place among the file's requests, from 0
    at_s: float  # seconds after the file's first request
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


@functools.lru_cache(maxsize=8)
def read_trace(path: str) -> tuple[TraceRow, ...]:
    """A trace file's requests in time order, in either format (raises ConfigError naming --trace)."""
    try:
        raw = Path(path).read_bytes()
        # gzipped as downloaded, and a spreadsheet's byte-order mark before the header
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise ConfigError(f"--trace: cannot read {path}: {exc}") from None
    try:
        parsed = mooncake_rows(text) if text.lstrip().startswith("{") else azure_rows(text)
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError, csv.Error) as exc:
        raise ConfigError(f"--trace: {path} is not {TRACE_FORMATS}: {exc}") from None
    need(bool(parsed), "trace", f"{path} holds no request")
    first = min(at for at, *_ in parsed)
    rows = [TraceRow(i, at - first, *lengths) for i, (at, *lengths) in enumerate(parsed)]
    return tuple(sorted(rows, key=lambda r: r.at_s))


def azure_rows(text: str) -> list[tuple]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"no column {', '.join(missing)} in its header")
    rows = []
    for number, row in enumerate(reader, start=2):
        try:
            at = azure_seconds(row["TIMESTAMP"])
            rows.append((at, *trace_lengths(row["ContextTokens"], row["GeneratedTokens"])))
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return rows


# 2023's traces: '2023-11-16 18:17:03.9799600'; 2024's: '2024-05-10 00:00:00.009930+00:00', and no fraction
# where it is zero
AZURE_STAMP = re.compile(r"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?")


def azure_seconds(stamp: str) -> float:
    """An Azure trace's timestamp (UTC where it names no offset) or plain seconds, as seconds."""
    found = AZURE_STAMP.fullmatch(stamp.strip())
    if not found:
        try:
            return finite_seconds(float(stamp), stamp)
        except ValueError:
            raise ValueError(
                f"timestamp {stamp!r} is neither seconds nor YYYY-MM-DD HH:MM:SS[.fraction][+HH:MM]"
            ) from None
    whole, fraction, offset = found.groups()
    moment = _dt.datetime.fromisoformat(
        f"{whole.replace(' ', 'T')}{'+00:00' if offset in (None, 'Z') else offset}"
    )
    return moment.timestamp() + float(fraction or 0.0)


def mooncake_rows(text: str) -> list[tuple]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            hashes = tuple(int(h) for h in item.get("hash_ids") or ())
            lengths = trace_lengths(item["input_length"], item["output_length"])
            rows.append(
                (finite_seconds(float(item["timestamp"]) / 1000, item["timestamp"]), *lengths, hashes)
            )
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            raise ValueError(f"line {number}: {exc!r}") from None
    return rows


MAX_TRACE_SECONDS = 1e11  # a trace's times as seconds (epoch seconds are 1.8e9): past it, not a time
MAX_TRACE_TOKENS = 10_000_000  # a trace request's prompt or output


def finite_seconds(seconds: float, stamp: Any) -> float:
    """A row's time; nan or inf is refused: such a row would fall out of every window unseen."""
    if not math.isfinite(seconds) or abs(seconds) > MAX_TRACE_SECONDS:
        raise ValueError(f"timestamp {stamp!r} is not a finite number of seconds below {MAX_TRACE_SECONDS:g}")
    return seconds


def trace_lengths(prompt: Any, output: Any) -> tuple[int, int]:
    prompt_tokens, output_tokens = int(prompt), int(output)
    if not (0 <= prompt_tokens <= MAX_TRACE_TOKENS and 1 <= output_tokens <= MAX_TRACE_TOKENS):
        raise ValueError(
            f"lengths {prompt_tokens} + {output_tokens}: a prompt of 0 to {MAX_TRACE_TOKENS:,} tokens and an "
            f"output of 1 to {MAX_TRACE_TOKENS:,}"
        )
    return prompt_tokens, output_tokens


def trace_files(cfg: Config) -> list[str]:
    return [f.strip() for f in cfg.trace.split(",") if f.strip()]


def trace_window(rows: tuple[TraceRow, ...], spec: str) -> tuple[float, float]:
    """Seconds replayed: START:END (either may be left out), busiest:SECONDS (most requests), '' for all."""
    head, _, tail = spec.partition(":")
    with contextlib.suppress(ValueError):  # not a number, or a length out of range: the error below
        if head == "busiest" and 0 < float(tail) < math.inf:
            times = [r.at_s for r in rows]
            counts = [bisect.bisect_left(times, t + float(tail)) - i for i, t in enumerate(times)]
            start = times[counts.index(max(counts))]  # the earliest of the busiest
            return start, start + float(tail)
        start, end = float(head or 0), float(tail) if tail else math.inf
        if 0 <= start < end:  # false for NaN too
            return start, end
    raise ConfigError(
        f"--trace-window: {spec!r} is not START:END seconds into the trace (0 <= START < END, either "
        "may be left out) or busiest:SECONDS"
    )


def window_rows(cfg: Config, path: str) -> tuple[float, list[TraceRow]]:
    """Where --trace-window starts in a trace file (seconds), and the file's requests within it."""
    rows = read_trace(path)
    start, end = trace_window(rows, cfg.trace_window)
    return start, [r for r in rows if start <= r.at_s < end]


def parse_rate_scales(cfg: Config) -> list[float]:
    why = "must be positive multiples of the trace's rate separated by commas, e.g. 0.5,1,2"
    return number_list(cfg, "trace_rate_scale", lambda v: v > 0, why)


def scaled(rows: list[TraceRow], scale: float, seed: str) -> list[TraceRow]:
    """Each row kept floor(scale) times, and once more with the chance of scale's fraction. One draw per
    row, so that a lower scale keeps a subset of a higher one's requests."""
    rng = random.Random(seed)
    return [row for row in rows for _ in range(math.floor(scale) + (rng.random() < scale % 1))]


def trace_prompt(rng: random.Random, row: TraceRow, prompt_tokens: int, seed: int) -> str:
    """A prompt of about prompt_tokens; with hash_ids, built block by block so that requests sharing a
    block share that stretch of their prompt (prefix caching can reuse it)."""
    if not row.hash_ids:
        return make_prompt(rng, row.row, prompt_tokens)
    words = max(1, prompt_tokens - CHAT_TEMPLATE_TOKENS)
    shared = [
        random.Random(f"{seed}-block-{h}").choices(FILLER_WORDS, k=TRACE_BLOCK_TOKENS) for h in row.hash_ids
    ]
    text = list(itertools.chain.from_iterable(shared))[:words]
    return " ".join(text + rng.choices(FILLER_WORDS, k=words - len(text)))


def replayed_file(cfg: Config, position: int) -> str:
    """The --trace file the model at `position` (A = 0) replays: the files are cycled over the models."""
    files = trace_files(cfg)
    return files[position % len(files)]


def trace_plan(cfg: Config, position: int, sizing: str) -> WorkloadPlan:
    """The model at `position` replays its file within --trace-window, time compressed by --trace-speedup:
    one window per --trace-rate-scale."""
    start, chosen = window_rows(cfg, replayed_file(cfg, position))
    rng, scales = random.Random(f"{cfg.seed}-trace-prompts-{position}"), parse_rate_scales(cfg)
    room = cfg.max_model_len - PROMPT_MARGIN_TOKENS
    planned = []
    for window, scale in enumerate(scales):
        for i, row in enumerate(scaled(chosen, scale, f"{cfg.seed}-trace-scale-{position}")):
            # a request too long for the context is cut: the output first, down to what leaves a short prompt
            short_prompt = min(row.prompt_tokens, MIN_CLIPPED_PROMPT_TOKENS)
            output_tokens = min(row.output_tokens, max(1, room - short_prompt))
            prompt_tokens = min(row.prompt_tokens, room - output_tokens)
            prompt = trace_prompt(rng, row, prompt_tokens, cfg.seed)
            clipped = (prompt_tokens, output_tokens) != (row.prompt_tokens, row.output_tokens)
            offset_s = round((row.at_s - start) / cfg.trace_speedup, 6)
            trace = {"trace_row": row.row, "prompt_tokens": prompt_tokens, "clipped": clipped}
            planned.append(
                PlannedRequest(window, i, prompt, output_tokens, cfg.temperature, offset_s, **trace)
            )
    return WorkloadPlan.of(cfg, planned, len(scales), sizing=sizing, arrivals="trace", rates=tuple(scales))


def check_trace(cfg: Config) -> None:
    """Every file readable, in a known format, with requests in the window (before anything launches)."""
    need(
        bool(trace_files(cfg)),
        "trace",
        "--arrivals trace needs --trace FILE[,FILE...] (one per model, cycled)",
    )
    need(not (cfg.rates or cfg.rate or cfg.peak_rates), "arrivals", "trace: leave out --rate(s)/--peak-rates")
    need(
        cfg.output_tokens_dist == "fixed", "output_tokens_dist", "a trace's lengths are its own: leave it out"
    )
    most = max(parse_rate_scales(cfg))
    for path in trace_files(cfg):
        start, rows = window_rows(cfg, path)
        need(
            bool(rows),
            "trace_window",
            f"{cfg.trace_window} selects no request of {path}, whose requests span "
            f"0-{read_trace(path)[-1].at_s:.0f} s",
        )
        need(
            len(rows) * most <= MAX_WINDOW_REQUESTS,
            "trace_rate_scale",
            f"{most:g} x the {len(rows):,} requests of {path} in the window are more than "
            f"{MAX_WINDOW_REQUESTS:,} in one window: lower it, or choose a shorter --trace-window",
        )
        replay_s = (rows[-1].at_s - start) / cfg.trace_speedup
        need(
            replay_s <= MAX_SECONDS,
            "trace_speedup",
            f"{path}'s window replays over {replay_s:,.0f} s, more than {MAX_SECONDS:,.0f}: raise it, or "
            "choose a shorter --trace-window",
        )


AUTO_LENGTH = -1  # --max-model-len auto


def trace_model_len(cfg: Config) -> int:
    """--max-model-len auto: the longest request in any model's window, within every model's own limit
    (a file beyond the models' count is replayed by none)."""
    replayed = dict.fromkeys(replayed_file(cfg, i) for i in range(len(slots(cfg))))
    rows = [r for path in replayed for r in window_rows(cfg, path)[1]]
    longest = max((r.prompt_tokens + r.output_tokens for r in rows), default=0)
    wanted = longest + PROMPT_MARGIN_TOKENS
    limits = [
        text_config(load_model_config(model_of(cfg, key))[0] or {}).get("max_position_embeddings")
        for key in slots(cfg)
    ]
    known = [v for v in limits if isinstance(v, int) and v > 0]
    chosen = min([wanted, *known])
    say(
        f"note: --max-model-len auto: {chosen} tokens (the longest request in the traces' windows, "
        f"{longest} tokens, and {PROMPT_MARGIN_TOKENS} of margin"
        + (f"; the models' own limit {min(known)}: longer requests are clipped" if chosen < wanted else "")
        + ("" if known else "; no model's limit known")
        + ")"
    )
    return chosen


# %% Secrets: never written to the run folder, the logs' headers or stdout
REDACTED = "***"
SECRET_WORDS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"}


def is_secret_name(name: str) -> bool:
    """VLLM_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, --api-key; not TOKENIZERS_PARALLELISM, --max-tokens."""
    parts = name.upper().replace("-", "_").strip("_").split("_")
    return parts[-1] in ("KEY", "APIKEY") or any(p in SECRET_WORDS for p in parts)


def redact_env(env: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if v and is_secret_name(k) else v) for k, v in env.items()}


def words_of(arg: str) -> list[str]:
    """An argument split as a shell would split it (`bash -c '... --token X'`); itself if it cannot be."""
    try:
        return shlex.split(arg)
    except ValueError:
        return [arg]


def redact_argv(argv: list[str]) -> list[str]:
    """`--api-key X` and `--api-key=X` become `--api-key ***`, and `HF_TOKEN=X` (`env`, `docker -e`)
    `HF_TOKEN=***`, also within one argument that is a command line itself (`bash -c '...'`), whatever
    their length."""
    out, hide_next = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        inner = words_of(arg)
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif flag.startswith("--") and is_secret_name(flag[2:]):
            out.append(f"{flag}={REDACTED}" if eq else arg)
            hide_next = not eq
        elif len(inner) > 1:
            hidden = redact_argv(inner)
            out.append(shlex.join(hidden) if hidden != inner else arg)
        elif (named := re.fullmatch(r"(--env=|-e)?([A-Za-z_]\w*)=.*", arg)) and is_secret_name(named[2]):
            out.append(f"{named[1] or ''}{named[2]}={REDACTED}")
        else:
            out.append(arg)
    return out


def register_secrets(cfg: "Config") -> None:
    """Remember every secret value we might see, so that scrub() can remove it from any text."""
    values = [cfg.api_key] + [v for k, v in os.environ.items() if is_secret_name(k)]
    values += [v for k, v in parse_env_pairs(cfg.kvcached_env).items() if is_secret_name(k)]
    for spec in (cfg.server_cmd, cfg.extra_server_args):
        values += secret_values(shlex.split(spec))
    STATE.secrets.update(v for v in values if v and len(v) >= 6)  # shorter values would mangle ordinary text


def secret_values(argv: list[str]) -> list[str]:
    """The values redact_argv hides, also inside one argument that is a command line (`bash -c '...'`)."""
    values = []
    for arg, shown in zip(argv, redact_argv(argv)):
        named = shown[: -len(REDACTED)]  # `--api-key=`, `HF_TOKEN=`, `-eHF_TOKEN=`: what stays shown
        if arg == shown:
            continue
        if shown == REDACTED:  # the value after a secret flag, spaces and all
            values.append(arg)
        elif shown.endswith(f"={REDACTED}") and arg.startswith(named):
            values += [arg, arg[len(named) :]]
        else:  # a command line in one argument, its secrets hidden inside it
            values += secret_values(words_of(arg))
    return values + [v.rstrip(";&|") for v in values]  # `--token X; exec vllm`: X without the `;`


def redact_env_pairs(spec: str) -> str:
    """--kvcached-env as given, or with its secret values hidden (see redact_env)."""
    pairs = parse_env_pairs(spec)
    shown = redact_env(pairs)
    return ",".join(f"{k}={v}" for k, v in shown.items()) if shown != pairs else spec


def redact_command(spec: str) -> str:
    """A command line or NAME=value list as given, its secrets hidden (see redact_argv)."""
    words = words_of(spec) if spec.strip() else []
    shown = redact_argv(words)
    return shlex.join(shown) if shown != words else spec


def scrub(text: str) -> str:
    return masked(text, STATE.secrets, REDACTED)


def masked(text: AnyStr, secrets: Iterable[AnyStr], mask: AnyStr) -> AnyStr:
    """`text` with each secret (longest first: one may hold another) replaced by `mask`."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, mask)
    return text


# %% Servers: what each one runs, and with which environment
@dataclasses.dataclass(frozen=True)
class ServerSpec:
    name: str  # slot: 'A', 'B', ...
    model: str
    port: int
    kvcached: bool
    gpu_memory_utilization: Optional[float] = None
    kv_cache_memory_bytes: Optional[int] = None
    sleep_mode: bool = False  # vLLM's sleep mode: /sleep and /wake_up free and refill the card

    @property
    def key(self) -> tuple:
        return dataclasses.astuple(self)

    @property
    def label(self) -> str:
        if self.kvcached:
            return f"{self.name} kvcached"
        if self.kv_cache_memory_bytes:
            return f"{self.name} static {self.kv_cache_memory_bytes / GIB:.3g} GiB KV"
        sleep = " + sleep mode" if self.sleep_mode else ""
        return f"{self.name} static {self.gpu_memory_utilization:g}{sleep}"

    @property
    def ipc_name(self) -> str:
        # Unique to this harness process: /dev/shm is shared with every user of the machine, and a
        # predictable name invites a planted file or symlink.
        return f"kvcached_bench_{os.getpid()}_{self.port}"


class ServerError(RuntimeError):
    """A server that did not come up, died, or is not ours, with the evidence to fix it."""


def slot_models(cfg: Config) -> list[str]:
    """The models sharing the card, in slot order: --models, else --model-a and --model-b."""
    return [m.strip() for m in cfg.models.split(",")] if cfg.models else [cfg.model_a, cfg.model_b]


def slots(cfg: Config) -> list[str]:
    return list(string.ascii_uppercase[: len(slot_models(cfg))])


def model_of(cfg: Config, slot: str) -> str:
    return slot_models(cfg)[slots(cfg).index(slot)]


def port_of(cfg: Config, slot: str) -> int:
    """--port + i; else --port-a for A, --port-b for B, and on from --port-b for C, D, ..."""
    i = slots(cfg).index(slot)
    if cfg.port:
        return cfg.port + i
    return cfg.port_a if i == 0 else cfg.port_b + i - 1


def port_flag(cfg: Config, slot: str) -> str:
    """The flag that moves `slot`'s port: --port-a or --port-b, or --port (the only one for C, D, ...)."""
    return "--port" if cfg.port or slots(cfg).index(slot) > 1 else f"--port-{slot.lower()}"


def server_prefix(cfg: Config) -> list[str]:
    if cfg.server_cmd:
        return shlex.split(cfg.server_cmd)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def server_command(cfg: Config, spec: ServerSpec) -> list[str]:
    """The server's argv, flags in this order: a value of True is a bare switch, None leaves it out."""
    flags = {
        "--model": spec.model,
        "--host": cfg.host,
        "--port": spec.port,
        "--max-model-len": cfg.max_model_len,
        # off by default: repeated prompt parts must not skip their KV demand
        "--enable-prefix-caching" if cfg.prefix_caching else "--no-enable-prefix-caching": True,
        "--enforce-eager": True,  # no CUDA graphs: faster start, less memory
        "--load-format": cfg.load_format or None,
        "--tokenizer": cfg.tokenizer or None,
        "--gpu-memory-utilization": spec.gpu_memory_utilization,
        "--kv-cache-memory-bytes": spec.kv_cache_memory_bytes,
        "--enable-sleep-mode": spec.sleep_mode or None,
    }
    cmd = server_prefix(cfg)
    for flag, value in flags.items():
        if value is True:
            cmd.append(flag)
        elif value is not None:
            cmd += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return cmd + shlex.split(cfg.extra_server_args)


def server_env(
    cfg: Config, spec: ServerSpec, base: Optional[dict] = None, run_env: Optional[dict] = None
) -> dict[str, str]:
    """Both arms set explicitly: a user's shell exporting ENABLE_KVCACHED must not flip the baseline.
    `run_env` is what every server of the run shares: the card NVML measures and the model runner. The API
    key travels in VLLM_API_KEY, not on the command line, where vLLM would log it among its arguments."""
    env = dict(os.environ if base is None else base) | (run_env or {})
    if spec.kvcached:
        env.update(ENABLE_KVCACHED="true", KVCACHED_AUTOPATCH="1", KVCACHED_IPC_NAME=spec.ipc_name)
        env.update(parse_env_pairs(cfg.kvcached_env))
    else:
        env.update(ENABLE_KVCACHED="false", KVCACHED_AUTOPATCH="0")
        env.pop("KVCACHED_IPC_NAME", None)
    if spec.sleep_mode or cfg.prefix_caching:  # vLLM serves /sleep, /wake_up, /reset_prefix_cache only so
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env["VLLM_WORKER_MULTIPROC_METHOD"] = engine_start_method(cfg, env)
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key
    else:  # a key in the caller's shell would make the server refuse our keyless requests
        env.pop("VLLM_API_KEY", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def engine_start_method(cfg: Config, env: Optional[dict] = None) -> str:
    """How vLLM starts its EngineCore process. `vllm serve` sets spawn, a fresh interpreter that spends
    ~20 s importing vLLM again; fork copies the API server, which has imported it already (and not
    touched the GPU: vLLM falls back to spawn itself if it had). Memory and latency are the same either
    way; only the start-up is shorter."""
    if cfg.engine_start != "auto":
        return cfg.engine_start
    return (os.environ if env is None else env).get("VLLM_WORKER_MULTIPROC_METHOD") or "fork"


# vLLM's access log lines of the harness's own polling: in a dead server's tail they would hide the cause
POLLING_LINE = re.compile(r'"GET /(metrics|health|is_sleeping)[ ?]')


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
        return scrub("\n".join([line for line in text if not POLLING_LINE.search(line)][-lines:]))
    except OSError as exc:
        return f"(log unreadable: {exc})"


# %% Processes, ports and the keeper: the one process that stops a server, and how the harness asks
# --- what the kernel says about processes and sockets (/proc)
def proc_stat(pid: int) -> Optional[tuple[str, int, int, int]]:
    """(state, ppid, process group, start time in clock ticks) of a live pid, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_of(pid: int, roots: dict[int, Any], max_depth: int = 32) -> Any:
    """The root (of `roots`) pid descends from, walking up its parents: not a pass over every process."""
    for _ in range(max_depth):
        if pid in roots:
            return roots[pid]
        stat_ = proc_stat(pid)
        if stat_ is None or stat_[1] <= 1:
            return None
        pid = stat_[1]
    return None


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants, from /proc (vLLM's GPU memory sits in a child)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat_ = proc_stat(int(entry))
            if stat_ is not None:
                children.setdefault(stat_[1], []).append(int(entry))
    tree = [root_pid]
    for pid in tree:  # the list grows as it is walked: each pid's children join it
        tree.extend(children.get(pid, []))
    return tree


def live_below(root_pid: int) -> list[int]:
    """The live processes below root_pid (an ended one, not yet reaped, a zombie, is not counted)."""
    stats = {pid: proc_stat(pid) for pid in process_tree(root_pid)[1:]}
    return [pid for pid, stat_ in stats.items() if stat_ is not None and stat_[0] not in ("Z", "X")]


TCP_LISTEN = "0A"  # /proc/net/tcp state of a listening socket
TCP_CLOSING = ("01", "04", "05", "06", "08", "09", "0B")  # established and closing connections


def port_sockets(port: int, states: tuple[str, ...]) -> set[int]:
    """Inodes of TCP sockets on this local port (any address, IPv4 or IPv6) in the given states."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError, StopIteration, IndexError, ValueError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in states:
                    inodes.add(int(fields[9]))
    return inodes


def socket_owners(inodes: set[int], pids: Optional[Iterable[int]] = None) -> set[int]:
    """Which of `pids` (default: every process we may look at) hold one of these socket inodes."""
    wanted = {f"socket:[{i}]" for i in inodes}
    found = set()
    for pid in pids if pids is not None else (int(e) for e in os.listdir("/proc") if e.isdigit()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        found.add(pid)
                        break
    return found


def port_taken(host: str, port: int) -> Optional[str]:
    """Why the port cannot be ours, or None if it is free. A socket that is bound but not listening
    yet (vLLM while its engine loads) is invisible in /proc/net/tcp; only a bind without
    SO_REUSEADDR collides with it."""
    listening = port_sockets(port, (TCP_LISTEN,))
    if listening:
        owners = socket_owners(listening)
        holders = "pid " + ", ".join(map(str, sorted(owners))) if owners else "another process"
        return f"in use: listened on by {holders}"
    error = bind_error(host, port)
    if error is None:
        return None
    if error.errno != errno.EADDRINUSE:
        return f"not bindable ({error.strerror})"
    if port_sockets(port, TCP_CLOSING):
        # connections of a server that just stopped also block a plain bind; vLLM binds with
        # SO_REUSEADDR, and wait_ready still checks that the listener is ours
        return None
    return "in use: bound by a process that does not listen yet (a server starting up?)"


def bind_error(host: str, port: int) -> Optional[OSError]:
    """What binding (host, port) raises, in the address family the host resolves to; None if it binds."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as exc:  # socket.gaierror too: a name that does not resolve
        return exc
    return None


# --- the keeper: a small supervisor between us and each server, and the only process that stops it
# Whatever ends this harness (Ctrl-C, kill -9, the OOM killer, a notebook restart), the keeper sees its
# end of the control pipe close and stops the server's whole tree. It is also a child subreaper, so an
# EngineCore orphaned by its API server stays below the keeper, where it is found and stopped. It walks
# the tree (process_tree) each time it signals: nothing is remembered, so a freed pid handed to a
# stranger is never among those it signals.
KEEPER_GRACE_S = 4.0  # after the harness is gone: SIGINT, this long, then SIGKILL
STOP_GRACE_S = 15.0  # a stop the harness asks for: SIGINT, this long, then SIGKILL
KILL_WAIT_S = 5.0  # after SIGKILL, how long the keeper waits for the tree to be gone


def keeper(control: int, segment: str, gone_grace_s: float, cmd: list[str], kill_wait_s: float) -> None:
    """A server's supervisor, in a Python of its own (keeper_source). It starts the server and ends it:
    on "stop GRACE_S" or "now" from the harness on `control`, on the pipe's end (the harness is gone),
    or when the server ends by itself, since what it leaves behind must go too. It exits once nothing of
    the server is left, with the server's exit code: that exit is the harness's "stopped"."""
    import contextlib
    import ctypes
    import os
    import signal
    import subprocess

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    # A handler, not SIG_IGN: the server must not inherit an ignored SIGINT (exec resets handlers).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    keeper_pid, libc = os.getpid(), ctypes.CDLL(None)
    secrets = os.environ.pop("KEEPER_SECRETS", "").split("\n")  # not for the server's environment

    def end_with_the_keeper() -> None:  # in the server, before exec
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a keeper killed by SIGKILL still stops it
        if os.getppid() != keeper_pid:  # the keeper died before that took hold
            os._exit(1)

    server = subprocess.Popen(cmd, preexec_fn=end_with_the_keeper)
    codes: dict[int, int] = {}
    order = None
    while order is None and server.pid not in codes:
        order = read_order(control, 0.2)
        reap_children(codes)
    grace_s = float(order.split()[1]) if order and order.startswith("stop ") else gone_grace_s
    left = end_tree(
        -1 if order == "gone" else control, 0.0 if order == "now" else grace_s, kill_wait_s, codes
    )
    problem = segment and unlink_segment(segment)
    if problem:
        print(f"[keeper] {problem}", flush=True)
    if left:
        print(f"[keeper] still alive after SIGKILL: pids {left}", flush=True)
    if order == "gone":  # the harness, which scrubs the log after a stop, is gone: what vLLM echoed stays
        scrub_own_log([s for s in secrets if s])
    code = codes.get(server.pid, 0)
    os._exit(code if code >= 0 else 128 - code)


def scrub_own_log(secrets: list[str]) -> None:
    """Replace each secret in the log this process writes to (its stdout) with ***, as scrub() does."""
    import contextlib
    import os

    with contextlib.suppress(OSError):
        path = os.readlink("/proc/self/fd/1")
        with open(path, "rb") as f:
            text = f.read()
        scrubbed = masked(text, [secret.encode() for secret in secrets], b"***")
        if scrubbed != text:
            tmp = f"{path}.keeper.tmp"
            with open(tmp, "wb") as f:
                f.write(scrubbed)
            os.replace(tmp, path)


def read_order(control: int, timeout_s: float) -> Optional[str]:
    """The harness's last order on the pipe within timeout_s: "stop GRACE_S", "now", "gone" (the pipe
    ended: the harness is gone, however it ended), or None. control -1: no pipe to read any more."""
    import os
    import select
    import time

    if control < 0:
        time.sleep(timeout_s)
        return None
    if not select.select([control], [], [], timeout_s)[0]:
        return None
    lines = os.read(control, 256).decode(errors="replace").split("\n")
    orders = [line.strip() for line in lines if line.strip()]
    return orders[-1] if orders else (None if lines != [""] else "gone")


def reap_children(codes: dict[int, int]) -> None:
    """Note the exit code of every child that ended, by pid (the server's orphans are children too)."""
    import contextlib
    import os

    with contextlib.suppress(ChildProcessError):  # raised once no child is left
        while (ended := os.waitpid(-1, os.WNOHANG))[0]:  # pid 0: none has ended yet
            codes.setdefault(ended[0], os.waitstatus_to_exitcode(ended[1]))


def end_tree(control: int, grace_s: float, kill_wait_s: float, codes: dict[int, int]) -> list[int]:
    """SIGINT to every process below this one, grace_s for them to end ("now" on `control` cuts it
    short), then SIGKILL to whatever is left; returns the pids alive even after that."""
    import contextlib
    import os
    import signal
    import time

    me, hurried = os.getpid(), False
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, kill_wait_s)):
        stuck = live_below(me)
        for pid in stuck:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL and stuck and grace_s > 0 and not hurried:  # the harness says it on
            with contextlib.suppress(OSError):  # a full disk under the log must not stop the kill
                line = f"[keeper] still running {grace_s:g} s after SIGINT: {comm_names(stuck)}; SIGKILL now"
                print(line, flush=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap_children(codes)
            left = live_below(me)
            if not left:
                return []
            for pid in left if sig == signal.SIGKILL else ():  # one forked since the last scan
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            order = read_order(control, 0.05)
            if order == "gone":
                control = -1
            if order == "now" and sig != signal.SIGKILL:
                hurried = True
                break
    reap_children(codes)
    return live_below(me)


def comm_names(pids: list[int]) -> str:
    """pid (kernel name) for each: never a command line, which can hold a key."""
    names = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                names.append(f"{pid} ({f.read().strip()})")
        except OSError:
            names.append(f"{pid} (gone)")
    return ", ".join(names)


def keeper_source() -> str:
    """The keeper's program for `python -c`; its arguments: control fd, segment path, grace, command."""
    helpers = (
        *(proc_stat, process_tree, live_below, unlink_segment, read_order, reap_children, comm_names),
        *(scrub_own_log, masked),
    )
    call = f"keeper(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4:], {KILL_WAIT_S!r})"
    return program_source(*helpers, end_tree, keeper, call="import sys\n" + call)


# --- stopping: the one way a server stops. The keeper does it; the harness gives the order and waits
def stop_servers(servers: list[RunningServer], why: str, grace_s: Optional[float] = None) -> float:
    """Stop them all at once (each keeper: SIGINT to the tree, grace_s, SIGKILL, the kvcached segment
    removed); the time taken, once every keeper has exited. A Ctrl-C or SIGTERM meanwhile makes it "stop
    now" (SIGKILL) but never abandons a server; the interrupt is re-raised after."""
    if not servers:
        return 0.0
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    started = time.time()
    with signals_held("interrupted while stopping servers"):  # a signal cannot cut the stop short
        hint = f"; press Ctrl-C again to kill {'them' if len(servers) > 1 else 'it'} now"
        say(
            f"  stopping {len(servers)} server{'s' if len(servers) > 1 else ''} ({why}), "
            f"up to {grace_s + KILL_WAIT_S:.0f} s{hint if STATE.signals_seen else ''}"
        )
        interrupted = await_keepers(servers, grace_s)
        for server in servers:
            settle(server)
        say(f"  stopped {', '.join(s.spec.label for s in servers)} in {time.time() - started:.1f} s")
    if interrupted and threading.current_thread() is threading.main_thread():  # signals concern it alone
        raise KeyboardInterrupt("interrupted while stopping servers")
    return time.time() - started


@contextlib.contextmanager
def signals_held(why: str) -> Iterator[None]:
    """In the main thread, a stop signal during the block is raised after it, as a KeyboardInterrupt(why)."""
    if threading.current_thread() is not threading.main_thread() or STATE.stopping.is_set():
        yield
        return
    STATE.stopping.set()
    try:
        yield
    finally:
        STATE.stopping.clear()
    if STATE.interrupt_pending.is_set():
        STATE.interrupt_pending.clear()
        raise KeyboardInterrupt(why)


def stop_every_server(pool: "ServerPool") -> bool:
    """The end of a run: every server of the pool stopped; True if a signal came meanwhile. One that comes
    before the stop is under way (in a notebook, a second press of stop) makes it kill them at once."""
    servers = pool.shut()
    try:
        stop_servers(servers, "end of run")
    except KeyboardInterrupt:
        STATE.hurry.set()
        with contextlib.suppress(KeyboardInterrupt):
            stop_servers([s for s in servers if not s.stopped], "interrupted again")
        return True
    return False


def await_keepers(servers: list[RunningServer], grace_s: float) -> bool:
    """Order each keeper to stop and wait for them to exit; "now" once STATE.hurry is set. True if a
    notebook's interrupt came meanwhile (in a script, the signal handler sets hurry instead)."""
    logged = {}  # where each log stood before the order
    for server in servers:
        with contextlib.suppress(OSError):
            logged[id(server)] = server.log_path.stat().st_size
        server.order(f"stop {grace_s:g}")
    interrupted, hurried = False, False
    give_up_at = time.time() + grace_s + KILL_WAIT_S + 5.0
    while any(s.proc.poll() is None for s in servers) and time.time() < give_up_at:
        try:
            if STATE.hurry.is_set() and not hurried:
                hurried = True
                for server in servers:
                    server.order("now")
            time.sleep(0.05)
        except KeyboardInterrupt:  # a notebook's interrupt: hurry, but finish the job
            interrupted = True
            STATE.hurry.set()
            say("  interrupted again: killing the servers now")
    for server in servers:  # what held a stop up, as its keeper wrote it in the log when it sent SIGKILL
        with contextlib.suppress(OSError), open(server.log_path, "rb") as f:
            f.seek(logged.get(id(server), 0))
            for line in f.read().decode(errors="replace").splitlines():
                if line.startswith("[keeper] ") and ("still running" in line or "still alive" in line):
                    say(f"    {line.removeprefix('[keeper] ')}")
    return interrupted


def log_lines(path: Path) -> int:
    """Whole lines in a log so far. Lines, not bytes, mark where an experiment took a server: scrubbing
    secrets out of the log at its stop changes its bytes, never its lines."""
    lines = 0
    with contextlib.suppress(OSError), path.open("rb") as log:
        for chunk in iter(lambda: log.read(1 << 20), b""):
            lines += chunk.count(b"\n")
    return lines


def settle(server: RunningServer) -> None:
    """After its keeper's stop: stopped only if the keeper has exited (it exits once nothing is left)."""
    server.stopped = server.proc.poll() is not None
    if not server.stopped:
        keeper_ = f"the keeper of {server.spec.label} (pid {server.proc.pid})"
        say(f"  warning: {keeper_} did not exit; still running: {comm_names(server.tree())}")
    if server.proc.stdin:  # one given a pipe to its stdin (see Preimporter), so that it hears EOF
        with contextlib.suppress(OSError):
            server.proc.stdin.close()
    if server.stopped:  # a keeper killed (kill -9) stopped nothing: what its server left still has its group
        with contextlib.suppress(OSError):
            os.killpg(server.proc.pid, signal.SIGKILL)
    if server.stopped and server.control is not None:
        os.close(server.control)
        server.control = None
    if STATE.secrets:  # a server may have printed them into its own log (vLLM echoes its arguments)
        with contextlib.suppress(OSError):
            text = server.log_path.read_text(errors="replace")
            if scrub(text) != text:
                write_text_atomic(server.log_path, scrub(text))


# %% The wire: HTTP/1.1 on plain sockets, each read timed as it arrives
READ_BYTES = 1 << 18  # one network read: a whole burst of tokens at once when they are there
CONNECT_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 2.0  # a socket idle longer is not reused: vLLM's front end closes idle ones after 5 s
# Linux stamps each packet as it arrives; Python names the option only from 3.13 on
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
STAMP_BYTES = socket.CMSG_SPACE(16)  # one struct timespec


class Connections(contextlib.AbstractContextManager):
    """Keep-alive sockets to the servers, shared by one burst's threads. The client speaks HTTP/1.1 on
    plain sockets: `requests` cost 2 ms of CPU per streamed answer (a thread for its deadline, a layer
    per chunk), and at 500 requests/s on two cores the client fell seconds behind its plan."""

    def __init__(self):
        self.idle: dict[tuple, list[tuple[socket.socket, float]]] = {}
        self.busy: set[socket.socket] = set()  # in a request's hands: close() shuts them down
        self.closed = False
        self.lock = threading.Lock()

    def get(self, address: tuple[str, int], timeout_s: float) -> tuple[socket.socket, bool]:
        """An idle socket still open, or a new one; and whether it was idle here before."""
        while True:
            with self.lock:
                if not self.idle.get(address):
                    break
                sock, since = self.idle[address].pop()
            if time.monotonic() - since < KEEP_ALIVE_S and still_connected(sock):
                return self.lend(sock), True
            sock.close()
        return self.lend(connect(address, min(CONNECT_TIMEOUT_S, max(timeout_s, 0.001)))), False

    def lend(self, sock: socket.socket) -> socket.socket:
        with self.lock:
            if self.closed:
                sock.close()
                raise ConnectionAbortedError("the burst is over")
            self.busy.add(sock)
        return sock

    def done(self, address: tuple[str, int], sock: socket.socket, keep: bool) -> None:
        """A socket back from a request (or new, from open_ahead): kept for a next, unless all are closed."""
        with self.lock:
            self.busy.discard(sock)
            if keep and not self.closed:
                self.idle.setdefault(address, []).append((sock, time.monotonic()))
                return
        sock.close()

    def open_ahead(self, url: str, count: int) -> None:
        """Connect `count` sockets before a closed burst, so that its TTFTs do not count the connects."""
        address = url_address(url)
        for _ in range(count - len(self.idle.get(address, ()))):
            self.done(address, connect(address, CONNECT_TIMEOUT_S), keep=True)

    def close(self) -> None:
        """Close them all. A socket still in a request's hands is shut down, so that a thread blocked
        reading it ends now: a server stopping gracefully waits for its open requests, which a server
        whose engine is gone never answers."""
        with self.lock:
            self.closed = True
            idle, self.idle, busy = self.idle, {}, list(self.busy)
        for sock in busy:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for sock, _ in itertools.chain.from_iterable(idle.values()):
            sock.close()

    def __exit__(self, *exc) -> None:
        self.close()


def connect(address: tuple[str, int], timeout_s: float) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request goes out in one write, now
    if SO_TIMESTAMPNS is not None:
        with contextlib.suppress(OSError):  # no stamps: each read is timed when it is read
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return sock


def url_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port or 80


def still_connected(sock: socket.socket) -> bool:
    """Whether an idle socket is open with nothing unread (a server's close reads as end-of-file)."""
    sock.settimeout(0)
    try:
        sock.recv(1, socket.MSG_PEEK)  # end-of-file, or bytes nobody asked for
    except OSError as exc:
        return isinstance(exc, BlockingIOError)  # nothing to read: still open
    return False


class Wire:
    """One response off a socket: network reads to an absolute deadline (a trickle of bytes does not
    extend it), each timed at its arrival, and what was read past the part asked for."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline, self.buffer, self.complete = sock, deadline, b"", False
        self.sent = self.arrived = time.perf_counter()

    def read(self) -> bytes:
        while True:
            left = self.deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError("no complete response before the deadline")
            self.sock.settimeout(left)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(READ_BYTES, STAMP_BYTES)
            except socket.timeout:
                continue  # woken a little early: the loop raises once the deadline has passed
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            self.arrived = arrival_time(ancillary, self.sent)
            return data

    def head(self) -> tuple[int, dict[str, str]]:
        """The status code and the headers (names in lower case)."""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.read()
        top, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = top.decode("latin-1").split("\r\n")
        fields = (line.partition(":") for line in lines)
        return int(status_line.split()[1]), {name.strip().lower(): value.strip() for name, _, value in fields}

    def body(self, headers: dict[str, str]) -> Iterator[tuple[float, bytes]]:
        """The body, unframed, as (arrival time, bytes) per network read; `complete` once it has ended."""
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = -1 if chunked else int(headers.get("content-length", -1))
        raw, now, seen = self.buffer, self.arrived, 0
        while True:
            data, raw, self.complete = dechunk(raw) if chunked else (raw, b"", 0 <= length <= seen + len(raw))
            seen += len(data)
            yield now, data
            if self.complete:
                return
            try:
                raw += self.read()
            except ConnectionError:
                if length < 0 and not chunked:
                    return  # a body without a length ends when the server closes
                raise
            now = self.arrived


def arrival_time(ancillary: list[tuple[int, int, bytes]], sent: float) -> float:
    """When the bytes just read reached this machine, on perf_counter's clock: the kernel's stamp of
    their last packet (wall clock), so that a client too busy to read at once does not add its own wait
    to the server's latencies; the read's own time where there is no stamp. Never before `sent`."""
    now = time.perf_counter()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = struct.unpack("qq", data[:16])
            arrived = seconds + nanoseconds * 1e-9 - wall_minus_perf()
            return max(arrived, sent) if arrived <= now else now  # a clock step reads as no stamp
    return now


def wall_minus_perf() -> float:
    """time.time() - time.perf_counter(), the wall clock read between two perf_counter reads close
    together: a thread switched out between the two clocks' reads would shift the stamps it converts."""
    for _ in range(5):
        before, wall, after = time.perf_counter(), time.time(), time.perf_counter()
        if after - before < 50e-6:
            break
    return wall - (before + after) / 2


def dechunk(raw: bytes) -> tuple[bytes, bytes, bool]:
    """The complete chunks at the front of a chunked body: (their data, the rest, whether the body ended)."""
    data, position = [], 0
    while (end_of_size := raw.find(b"\r\n", position)) >= 0:
        size = int(raw[position:end_of_size].split(b";", 1)[0], 16)
        start = end_of_size + 2
        if size == 0:  # the body ends with an empty line, after any trailer lines
            rest = raw[start:]
            ended = rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
            return b"".join(data), b"" if ended else raw[position:], ended
        if len(raw) < start + size + 2:
            break
        data.append(raw[start : start + size])
        position = start + size + 2
    return b"".join(data), raw[position:], False


def http_request(method: str, url: str, payload: bytes = b"", api_key: str = "") -> bytes:
    """An HTTP/1.1 request's bytes, with a JSON body if there is one."""
    parts = urllib.parse.urlsplit(url)
    head = [f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1"]
    head += [f"Host: {parts.netloc}", *([f"Authorization: Bearer {api_key}"] if api_key else [])]
    head += ["Content-Type: application/json"] if payload else []
    head += [f"Content-Length: {len(payload)}"] if payload or method == "POST" else []
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


def http_call(
    connections: Connections, method: str, url: str, timeout_s: float, body: Any = None, api_key: str = ""
) -> tuple[int, bytes]:
    """One request and its whole answer: (status, body). Raises OSError or ValueError when there is none."""
    request = http_request(method, url, b"" if body is None else json.dumps(body).encode(), api_key)
    with exchange(connections, url, request, time.perf_counter() + timeout_s) as (wire, status, headers):
        return status, b"".join(data for _, data in wire.body(headers))


@contextlib.contextmanager
def exchange(
    connections: Connections, url: str, request: bytes, deadline: float
) -> Iterator[tuple[Wire, int, dict[str, str]]]:
    """Send `request` and yield the wire, the response's status and its headers; the socket goes back to
    `connections` if the body was read to its end and the server keeps it open. A kept socket that the
    server closed meanwhile fails before any byte of a response: the request goes again, on another one."""
    address = url_address(url)
    while True:
        sock, kept = connections.get(address, deadline - time.perf_counter())
        wire = Wire(sock, deadline)
        try:
            sock.settimeout(max(deadline - time.perf_counter(), 0.001))
            sock.sendall(request)
            status, headers = wire.head()
            break
        except BaseException as exc:
            connections.done(address, sock, keep=False)
            if not (isinstance(exc, ConnectionError) and kept and not wire.buffer):
                raise
    try:
        yield wire, status, headers
    finally:
        keep = wire.complete and headers.get("connection", "").lower() != "close"
        connections.done(address, sock, keep)


# %% Running servers: start, readiness on /health, the pool that keeps them across experiments
@dataclasses.dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen  # the keeper; the server is its child, in the keeper's group
    cmd: list[str]  # as shown: secrets redacted
    env_shown: dict[str, str]  # the KVCACHED_* / VLLM_* / CUDA_* part of its environment, redacted
    log_path: Path
    started_at: float
    host: str = "127.0.0.1"
    ready_at: Optional[float] = None
    control: Optional[int] = None  # our end of the keeper's control pipe: orders go there
    warmed: set[str] = dataclasses.field(default_factory=set)  # plan shapes this server has served
    together: tuple[str, ...] = ()  # labels of the servers started at the same time as this one
    facts: dict = dataclasses.field(default_factory=dict)  # more for describe(), from who started it
    model_runner: Optional[str] = None  # vLLM's model runner, V1 or V2, read from its log once ready
    asleep: bool = False  # sleep mode: put to sleep and not woken since
    stopped: bool = False  # set once nothing of it is alive any more

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.spec.port}"  # ::1 too

    @property
    def startup_s(self) -> Optional[float]:
        return None if self.ready_at is None else self.ready_at - self.started_at

    def tree(self) -> list[int]:
        """The keeper and its processes now."""
        return process_tree(self.proc.pid)

    def live_pids(self) -> list[int]:
        """Its server's processes still alive, below the keeper; none once the keeper has exited."""
        return live_below(self.proc.pid) if self.proc.poll() is None else []

    def order(self, what: str) -> None:
        """Tell the keeper "stop GRACE_S" or "now"; one that has exited needs no order."""
        if self.control is not None:
            with contextlib.suppress(OSError):
                os.write(self.control, f"{what}\n".encode())

    def exit_code(self) -> Optional[int]:
        return self.proc.poll()

    def fail_if_dead(self, when: str) -> None:
        """The ServerError with the evidence where the server has exited (`when`: "before 'burst 1'", ...)."""
        code = self.exit_code()
        if code is not None:
            raise self.failure(f"server {self.spec.label} {exit_words(code)} {when}.")

    def describe(self) -> dict:
        return {
            "label": self.spec.label,
            "spec": dataclasses.asdict(self.spec),
            "cmd": self.cmd,
            "cmd_shell": shlex.join(self.cmd),
            "env": self.env_shown,
            "log": str(self.log_path),
            "startup_s": self.startup_s,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "model_runner": self.model_runner,
            **({"started_together_with": list(self.together)} if self.together else {}),
            **self.facts,
        }

    def failure(self, problem: str) -> ServerError:
        """The error for what went wrong, with the evidence: command, log and the log's tail."""
        log = f"log: {self.log_path}\n--- last 40 lines of the log (not the harness's polling) ---\n"
        log += tail(self.log_path)
        return ServerError(f"{problem}\ncommand: {shlex.join(self.cmd)}\n{log}")


def start_checks(cfg: Config, spec: ServerSpec) -> None:
    """What must hold the moment a server starts: its port free, its kvcached segment name unused."""
    taken = port_taken(cfg.host, spec.port)
    if taken:
        raise ServerError(
            f"port {spec.port} is already {taken}. Stop what holds it "
            f"(`ss -ltnp | grep {spec.port}`) or pick others with --port (or --port-a/--port-b)"
        )
    if spec.kvcached and not remove_segment(spec.ipc_name):
        raise ServerError(
            f"{segment_path(spec.ipc_name)} exists and is not ours: kvcached would share it "
            f"with a stranger. Remove it (as its owner) and run again."
        )


def start_server(
    cfg: Config, spec: ServerSpec, log_path: Path, run_env: Optional[dict] = None, staged: bool = False
) -> RunningServer:
    """Launch a server now, under its keeper. `staged`: it only imports vLLM, and starts when
    release_staged() says go on its stdin; it binds no port before that, so none is checked now."""
    cmd = server_command(cfg, spec)
    launch = staged_command(cmd) if staged else cmd
    if launch is None:
        raise ServerError(
            f"only a `python -m MODULE` server command can be imported ahead, not {shlex.join(cmd)}"
        )
    if not staged:
        start_checks(cfg, spec)
    env = server_env(cfg, spec, run_env=run_env)
    shown = redact_env(
        {k: v for k, v in env.items() if k.startswith(("KVCACHED_", "ENABLE_KVCACHED", "VLLM_", "CUDA_"))}
    )
    cmd_shown = redact_argv(cmd)
    note = "(imported ahead: the server starts when the harness says go)\n" if staged else ""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        env_line = " ".join(f"{k}={v}" for k, v in sorted(shown.items()))
        log.write(scrub(f"$ {env_line} {shlex.join(cmd_shown)}\n{note}").encode())
        log.flush()
        # Own session: Ctrl-C in a terminal does not hit the servers before we stop them. Only this
        # process holds the pipe's write end (close-on-exec), so it ends when this process does.
        theirs, ours = os.pipe()
        segment = str(segment_path(spec.ipc_name)) if spec.kvcached else ""
        keeper_cmd = [sys.executable, "-S", "-c", keeper_source(), str(theirs), segment, str(KEEPER_GRACE_S)]
        try:  # -S: the keeper needs only the standard library, not site-packages' start-up hooks
            proc = subprocess.Popen(
                [*keeper_cmd, *launch],
                env={**env, "KEEPER_SECRETS": "\n".join(sorted(STATE.secrets))},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if staged else subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(theirs,),
            )
        except BaseException:
            os.close(ours)
            raise
        finally:
            os.close(theirs)
    started_at = time.time()
    return RunningServer(
        spec=spec,
        proc=proc,
        cmd=cmd_shown,
        env_shown=shown,
        log_path=log_path,
        started_at=started_at,
        host=cfg.host,
        control=ours,
        facts={"imported_ahead_from": started_at} if staged else {},  # started_at moves to the release
    )


def listener_is_ours(server: RunningServer) -> Optional[bool]:
    """Whether the socket listening on its port is of its process tree; None if nothing listens there now."""
    inodes = port_sockets(server.spec.port, (TCP_LISTEN,))
    return bool(socket_owners(inodes, server.tree())) if inodes else None


def health_ok(server: RunningServer, timeout_s: float = 2.0) -> bool:
    try:
        with Connections() as connections:
            return http_call(connections, "GET", server.url + "/health", timeout_s)[0] == 200
    except (OSError, ValueError):
        return False


def wait_ready(
    server: RunningServer, timeout_s: float, poll_s: float = 0.25, progress_every_s: float = 10.0
) -> float:
    """Poll /health until 200 from *our* process; fail fast with the log's tail if it exits first. The
    first polls come quickly (one imported ahead answers within a second), so start-up is read to a poll."""
    label, deadline = server.spec.label, server.started_at + timeout_s
    interval, next_progress = min(poll_s, 0.02), time.time() + progress_every_s
    while True:
        code = server.exit_code()
        if code is not None:
            raise server.failure(
                f"server {label} {exit_words(code)} before it was ready."
                f"{start_hint(server)}{runner_hint(server)}"
            )
        ours = listener_is_ours(server) if health_ok(server) else None
        if ours is False:
            raise server.failure(
                f"port {server.spec.port} answers /health, but the socket listening there does not "
                f"belong to our server {label} (pids {sorted(server.tree())}): another server is using "
                f"the port. Measuring it would record someone else's numbers; pick free ports with "
                f"--port (or --port-a/--port-b)."
            )
        if ours:
            server.ready_at = time.time()
            server.model_runner = runner_from_log(server.log_path)
            return server.startup_s
        now = time.time()
        if now > deadline:
            raise server.failure(
                f"server {label} not ready after {timeout_s:.0f} s "
                f"(raise --start-timeout-s if it is still loading).{start_hint(server)}"
            )
        if now >= next_progress:
            waited, last = now - server.started_at, tail(server.log_path, 1).strip()[:120]
            say(f"    ... waiting for {label} on :{server.spec.port}: {waited:.0f} s  | {last}")
            next_progress = now + progress_every_s
        pause(interval)
        interval = min(poll_s, interval * 2)


def runner_hint(server: RunningServer) -> str:
    """kvcached's refusal of the model runner it was given, with what to do about it."""
    if not server.spec.kvcached or "KVCachedConfigError" not in tail(server.log_path, 80):
        return ""
    given = server.env_shown.get(RUNNER_VARIABLE)
    if given is None:  # vLLM's version was not known (e.g. --server-cmd), so vLLM chose
        return (
            f" kvcached refused the model runner vLLM chose ({RUNNER_VARIABLE} unset): set it in the shell "
            f"to the runner kvcached's error above names ({RUNNER_VARIABLE}=0 for V1)."
        )
    return (
        f" kvcached refused vLLM's model runner ({RUNNER_VARIABLE}={given}): unset {RUNNER_VARIABLE} in "
        f"the shell, and the harness gives every server the runner kvcached needs (--check says which). "
        "Where the shell sets none, the servers' vLLM is not the one --check read: run --server-cmd with "
        "its Python (`/venv/bin/python -m vllm.entrypoints.openai.api_server`)."
    )


KVCACHED_WAIT = "Waiting for physical KV capacity"  # kvcached 0.1.6's log line while it cannot map a page


def kvcached_utilization(env: dict[str, str]) -> float:
    """KVCACHED_GPU_UTILIZATION in `env` (0.95 where unset or unreadable): kvcached 0.1.6 maps a KV page only
    while 1 minus that of the card stays free; a server that cannot map one waits, and its requests too."""
    try:
        return min(max(float(env.get("KVCACHED_GPU_UTILIZATION", "0.95")), 0.0), 1.0)
    except ValueError:
        return 0.95


def kv_wait_hint(server: RunningServer) -> str:
    """A kvcached server whose requests wait because it cannot map a KV page: what holds the memory."""
    if not server.spec.kvcached or KVCACHED_WAIT not in tail(server.log_path, 20):
        return ""
    kept = f"{1 - kvcached_utilization(server.env_shown):.0%}"
    return (
        f"; kvcached waits for memory to map KV pages (its log: {KVCACHED_WAIT!r}): it maps one only while "
        f"{kept} of the card (1 - KVCACHED_GPU_UTILIZATION) stays free, so the other servers or processes "
        "on the card hold too much (--check counts it)"
    )


def start_hint(server: RunningServer) -> str:
    """What to try for a server that ended before it was ready, where its log or start says."""
    log = tail(server.log_path, 80)
    if "Free memory on device" in log:
        return (
            " vLLM found too little free memory: something else holds the card (nvidia-smi), or the static "
            "shares are too large (--gpu-memory-utilization, --pair-utilization-b, --static-shares)."
        )
    if re.search(r"error: (unrecognized arguments|argument )", log):  # argparse's usage error, as vLLM's
        return " vLLM refused its arguments (the log's last lines say which): check --extra-server-args."
    with contextlib.suppress(OSError):
        log = server.log_path.read_text(errors="replace")
    if server.env_shown.get("VLLM_WORKER_MULTIPROC_METHOD") != "fork" or "non-default args" not in log:
        return ""  # forked or not, one that never got as far as vLLM's arguments needs another fix
    return (
        " Its engine process was forked from the API server (--engine-start); if the log ends while "
        "that process starts, try --engine-start spawn, vLLM's own way."
    )


def exit_words(code: int) -> str:
    """A server's end as its keeper tells it: its exit code, or the keeper killed (the server got SIGTERM)."""
    if code < 0:
        return f"ended when its keeper was killed ({signal.Signals(-code).name})"
    if code - 128 in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGTERM, signal.SIGBUS):
        oom = ", the kernel's out-of-memory killer?" if code - 128 == signal.SIGKILL else ""
        return f"exited with code {code} (killed by {signal.Signals(code - 128).name}{oom})"
    return f"exited with code {code}"


def server_problem(server: RunningServer) -> Optional[str]:
    """Why this server cannot serve now (it died, or /health fails), or None if it is fine."""
    code = server.exit_code()
    if code is not None:
        return exit_words(code)
    if not health_ok(server, timeout_s=5.0):
        return "does not answer /health"
    if not listener_is_ours(server):  # someone else's, or nobody's
        return f"no longer owns port {server.spec.port}"
    return None


def pause(seconds: float) -> None:
    """time.sleep, for nothing where the time has already passed."""
    time.sleep(max(0.0, seconds))


class Ahead:
    """The pool's hooks for servers made ready ahead of their start; this one makes none (see Preimporter)."""

    def prepare(self, specs: list[ServerSpec], log_dir: Path) -> None:
        """These servers start later: get them ready now, where that saves time."""

    def take(self, spec: ServerSpec) -> Optional[RunningServer]:
        """A server for `spec` made ready ahead, started now, or None to start one as usual."""
        return None

    def give_back(self, keep: Iterable[tuple] = ()) -> list[RunningServer]:
        """The servers held for specs other than `keep`, handed over to be stopped."""
        return []


class ServerPool:
    """Keeps servers across experiments that can share them, until shut() hands them all over to be
    stopped. A server leaves the pool only once nothing of it is alive (stop_servers marks it)."""

    def __init__(self, cfg: Config, run_env: Optional[dict] = None, ahead: Optional[Ahead] = None):
        self.cfg, self.run_env = cfg, run_env
        self.running: dict[tuple, RunningServer] = {}
        self.ahead = ahead or Ahead()

    def forget_stopped(self) -> None:
        self.running = {key: s for key, s in self.running.items() if not s.stopped}

    def shut(self) -> list[RunningServer]:
        """The servers running or held ahead, handed over to be stopped."""
        servers = [s for s in self.running.values() if not s.stopped] + self.ahead.give_back()
        self.running.clear()
        return servers

    def prepare(self, specs: Iterable[ServerSpec], log_dir: Path) -> None:
        """Hook: servers that will start later, for `ahead` to get ready now (none already running)."""
        self.ahead.prepare([s for s in specs if s.key not in self.running], log_dir)

    def ensure(self, specs: list[ServerSpec], log_dir: Path) -> list[RunningServer]:
        wanted = {s.key for s in specs}
        stop_servers([s for k, s in self.running.items() if k not in wanted], "not needed now")
        stop_servers(self.ahead.give_back(keep=wanted), "made ready ahead, not needed")
        self.forget_stopped()
        for spec in specs:  # a running server is reused only if it still serves, and from our process
            server = self.running.get(spec.key)
            problem = server and server_problem(server)
            if problem:
                log_tail = tail(server.log_path, 5)
                say(f"  {spec.label} {problem}: not reusing it, starting a new one\n{log_tail}")
                stop_servers([server], "dead or not ours")
                self.forget_stopped()
            elif server:
                say(f"  reusing {spec.label} (saves a {server.startup_s:.1f} s start-up)")
                if spec.sleep_mode:  # left awake by a failed experiment, it would hold the card's memory
                    put_to_sleep(server, self.cfg)
        new = [spec for spec in specs if spec.key not in self.running]
        # kvcached servers take KV memory only when it is used, so they can start together; a static
        # server sizes its pool from the free memory it sees while starting, so those go one at a time
        together = [spec for spec in new if spec.kvcached]
        batches = ([together] if together else []) + [[spec] for spec in new if not spec.kvcached]
        for batch in batches[1:]:  # the later ones get ready while the first batch starts
            self.prepare(batch, log_dir)
        for batch in batches:
            self.start_together(batch, log_dir)
        return [self.running[spec.key] for spec in specs]

    def start_together(self, specs: list[ServerSpec], log_dir: Path) -> None:
        started: list[RunningServer] = []
        try:
            for spec in specs:
                log_path = server_log(log_dir, spec)
                server = self.ahead.take(spec) or start_server(self.cfg, spec, log_path, self.run_env)
                self.running[spec.key] = server
                started.append(server)
                server.together = tuple(s.label for s in specs if s is not spec)
                say(f"  starting {spec.label}: {spec.model} on :{spec.port}  (log: {server.log_path})")
            for server in started:
                wait_ready(server, self.cfg.start_timeout_s)
                together = " (started together with the others)" if len(started) > 1 else ""
                say(f"  {server.spec.label} ready after {server.startup_s:.1f} s{together}")
                # it sleeps until a burst needs it: the next server may take the card
                if server.spec.sleep_mode:
                    try:
                        took = put_to_sleep(server, self.cfg)
                    except ServerError:  # awake, it would hold the card the next server needs
                        stop_servers([server], "it could not be put to sleep")
                        raise
                    say(f"  {server.spec.label} put to sleep (level {self.cfg.sleep_level}) in {took:.2f} s")
        except BaseException as e:  # never keep (or later reuse) a server that did not come up
            why = "interrupted while it started" if isinstance(e, KeyboardInterrupt) else "it did not come up"
            stop_servers([s for s in started if s.ready_at is None], why)
            self.forget_stopped()
            raise


def server_log(log_dir: Path, spec: ServerSpec) -> Path:
    return log_dir / f"server_{spec.name}_{'kvcached' if spec.kvcached else 'static'}.log"


# %% Importing vLLM ahead (--preimport): the Preimporter, behind the pool's hooks (Ahead)
# Its API server's imports take 15-20 s of one core and touch no GPU, so the next experiment's servers
# can do them while the current one runs, and start ~15 s sooner when asked. A server imported ahead
# runs under its keeper like any other, so the one stop path (stop_servers) stops it too.
class Preimporter(Ahead):
    """Servers that have imported vLLM and wait for "go" on their stdin, one per spec."""

    def __init__(self, cfg: Config, run_env: Optional[dict] = None):
        self.cfg, self.run_env = cfg, run_env
        self.staged: dict[tuple, RunningServer] = {}  # imported ahead, not started yet

    def prepare(self, specs: list[ServerSpec], log_dir: Path) -> None:
        for spec in specs:
            if spec.key in self.staged:
                continue
            try:
                log_path = server_log(log_dir, spec)
                self.staged[spec.key] = start_server(self.cfg, spec, log_path, self.run_env, staged=True)
            except (OSError, ServerError) as exc:  # a saving, not a need: it starts the usual way later
                say(f"  could not import vLLM ahead for {spec.label} ({exc}); it will start as usual")
            else:
                say(f"  importing vLLM for {spec.label} ahead of its start (--preimport)")

    def take(self, spec: ServerSpec) -> Optional[RunningServer]:
        server = self.staged.pop(spec.key, None)
        if server is None:
            return None
        try:
            release_staged(self.cfg, server)
            waited = server.started_at - server.facts["imported_ahead_from"]
            say(f"  {spec.label}: vLLM was imported ahead {waited:.0f} s ago")
        except BaseException:  # an interrupt too: nothing else holds this server yet
            stop_servers([server], "it could not be started")
            raise
        return server

    def give_back(self, keep: Iterable[tuple] = ()) -> list[RunningServer]:
        keep = set(keep)
        gone = [self.staged.pop(key) for key in [k for k in self.staged if k not in keep]]
        return [server for server in gone if not server.stopped]


def ahead_for(cfg: Config, run_env: Optional[dict] = None) -> Ahead:
    return Preimporter(cfg, run_env) if preimport_on(cfg) else Ahead()


def import_first_servers(run: Run, pool: "ServerPool") -> None:
    """With --preimport, the first servers import vLLM while its import check runs (import_checks_beside)."""
    if run.import_checks is None:
        return
    (lane,) = run.lanes
    first = lane.experiments[0]
    servers = resolve_experiment(first, lane.cfg, run.plans, run.budget).servers
    pool.prepare(servers, experiment_dir(run, first))
    try:
        confirm_imports(run, "the servers importing vLLM ahead were stopped before they started")
    except ConfigError:
        stop_servers(pool.shut(), "vLLM's import check failed")
        raise


def confirm_imports(run: Run, stopped: str = "") -> None:
    """vLLM's import check, started beside (import_checks_beside), has passed; else a ConfigError."""
    checks = run.import_checks.result()
    if all(c.ok for c in checks):
        say(checklist(checks, "preflight, imports (checked while the first servers imported vLLM):"))
        return
    raise ConfigError(
        f"preflight failed{'; ' + stopped if stopped else ''} (--check repeats it):\n" + checklist(checks)
    )


def import_checks_beside(
    cfg: Config, experiments: list[Experiment]
) -> "concurrent.futures.Future[list[Check]]":
    """The import check in the background, while the first servers import vLLM too (--preimport):
    importing is all either does, so neither holds the card or a port before the check has passed."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def check() -> None:
        try:
            future.set_result(check_serving_imports(cfg, needs_kvcached(experiments)))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=check, daemon=True, name="import-check").start()  # an exit never waits on it
    return future


def run_staged(module: str, args: list[str]) -> None:
    """Imports `module` ahead, waits for "go" on stdin (EOF: exit), then runs it as `python -m` would."""
    import importlib
    import runpy
    import sys
    import time
    import warnings

    t0 = time.time()
    importlib.import_module(module)
    print(f"[harness] {module} imported in {time.time() - t0:.1f} s; waiting for the start", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)
    sys.stdin.close()
    sys.argv = [module, *args]
    warnings.filterwarnings("ignore", "'" + module, RuntimeWarning)  # "found in sys.modules": by design
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def module_launch(cmd: list[str]) -> Optional[tuple[list[str], str, list[str]]]:
    """`python [-FLAGS] -m MODULE ARGS...` as (python and its flags, MODULE, ARGS), else None."""
    flags = list(itertools.takewhile(lambda a: re.fullmatch(r"-[bBdEiIOqsSuv]+", a), cmd[1:]))
    rest = cmd[1 + len(flags) :]
    if len(rest) < 2 or rest[0] != "-m":
        return None
    return [cmd[0], *flags], rest[1], rest[2:]


def staged_command(cmd: list[str]) -> Optional[list[str]]:
    """A `python -m MODULE ARGS...` command as a staged launch, None for any other command."""
    launch = module_launch(cmd)
    if launch is None:
        return None
    python, module, args = launch
    source = program_source(run_staged, call="import sys\nrun_staged(sys.argv[1], sys.argv[2:])")
    return [*python, "-c", source, module, *args]


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def preimport_on(cfg: Config, cores: Optional[int] = None) -> bool:
    """auto: only with cores to spare, as the import runs beside a measured burst (a T4 Colab has 2)."""
    if staged_command(server_prefix(cfg)) is None or cfg.preimport == "off":
        return False
    cores = usable_cores() if cores is None else cores
    return cfg.preimport == "on" or cores >= PREIMPORT_CORES_PER_CARD * len(gpu_indices(cfg))


PREIMPORT_CORES_PER_CARD = 8


def release_staged(cfg: Config, server: RunningServer) -> None:
    """Tell a staged server to start; its start-up is timed from here."""
    server.fail_if_dead("while vLLM was being imported ahead of its start")
    start_checks(cfg, server.spec)  # the server that held this port may have stopped just now
    try:
        server.proc.stdin.write(b"go\n")
        server.proc.stdin.close()
    except OSError as exc:  # it died between the check and the write
        raise server.failure(f"server {server.spec.label} could not be told to start ({exc}).") from exc
    server.started_at = time.time()


# %% kvcached's own view: its per-instance shared-memory segment (three int64: total, used, prealloc)
SHM_DIR = Path("/dev/shm")  # where kvcached 0.1.6 puts KVCACHED_IPC_NAME
SEGMENT = struct.Struct("<qqq")


class SegmentError(OSError):
    """A segment that is not what kvcached would have made for us: not read, written or removed."""


def segment_path(ipc_name: str) -> Path:
    return SHM_DIR / ipc_name


@contextlib.contextmanager
def open_segment(ipc_name: str, write: bool = False) -> Iterator[int]:
    """The segment's fd, opened without following links, checked to be our own regular file of the expected
    size (/dev/shm is writable by every user), and locked: shared to read (kvcached's writers take LOCK_EX),
    exclusive to write. The lock is tried a few times, not waited for: a stranger costs a sample, not 40 s."""
    fd = os.open(segment_path(ipc_name), (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size < SEGMENT.size:
            raise SegmentError(
                f"{segment_path(ipc_name)}: not our kvcached segment (uid {info.st_uid}, "
                f"{info.st_size} bytes)"
            )
        for _ in range(50 if write else 5):
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            time.sleep(0.01)
        else:
            raise SegmentError("kvcached segment is locked by another process")
        yield fd
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_segment(ipc_name: str) -> Optional[dict]:
    """kvcached's memory accounting for one instance; None if the segment is absent (not yet made, or
    gone). Raises SegmentError for a segment that is not ours or stays locked."""
    try:
        with open_segment(ipc_name) as fd:
            data = os.pread(fd, SEGMENT.size, 0)
    except FileNotFoundError:
        return None
    if len(data) < SEGMENT.size:
        return None
    return dict(zip(("total_bytes", "used_bytes", "prealloc_bytes"), SEGMENT.unpack(data)))


def write_segment_limit(ipc_name: str, limit_bytes: int) -> None:
    """What `kvctl limit NAME SIZE` does: rewrite the instance's total under an exclusive lock."""
    with open_segment(ipc_name, write=True) as fd:
        os.pwrite(fd, struct.pack("<q", limit_bytes), 0)


def remove_segment(ipc_name: str) -> bool:
    """Remove our segment; True if none is left. Never removes (or follows) what is not ours."""
    problem = unlink_segment(str(segment_path(ipc_name)))
    if problem:
        say(f"  warning: {problem}")
    return problem is None


def unlink_segment(path: str) -> Optional[str]:
    """Remove a segment if it is our own regular file; None once none is left, else why it stays. The
    keeper runs it too, as kvcached cannot unlink its segment when its engine was killed."""
    import contextlib
    import os
    import stat

    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return f"not removing {path}: a symlink, not ours"
    if not stat.S_ISREG(info.st_mode):
        return f"not removing {path}: not a regular file, not ours"
    if info.st_uid != os.getuid():
        return f"not removing {path}: owned by uid {info.st_uid}, not ours"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return None


def pair_limits(budget: int, segments: dict[str, dict]) -> dict[str, int]:
    """kvcached limits per instance so the pair never holds more than `budget` of KV memory: each may
    grow into whatever the other does not hold now (used + preallocated pages)."""
    held = {name: seg["used_bytes"] + seg["prealloc_bytes"] for name, seg in segments.items()}
    return {name: max(0, budget - sum(v for other, v in held.items() if other != name)) for name in segments}


# %% GPU memory sampling, part 1: NVML's facts and process list, vLLM's /metrics (NVML, never torch)
def load_nvml(module: Any = None) -> Any:
    """The NVML module (nvidia-ml-py's `pynvml`), initialised; injectable for tests."""
    if module is None:
        try:
            import pynvml as module
        except ImportError as exc:
            raise RuntimeError("NVML not importable: pip install nvidia-ml-py") from exc
    module.nvmlInit()
    return module


def nvml_text(value: Any) -> Any:
    """NVML's strings: bytes from older bindings, str from newer ones."""
    return value.decode() if isinstance(value, bytes) else value


def gpu_facts(nvml: Any, index: int) -> dict:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    facts = {
        "index": index,
        "name": nvml_text(nvml.nvmlDeviceGetName(handle)),
        "driver": nvml_text(nvml.nvmlSystemGetDriverVersion()),
        "uuid": nvml_text(nvml.nvmlDeviceGetUUID(handle)),
        "total_mib": mem.total / MIB,
        "used_mib_at_start": mem.used / MIB,
        "free_mib_at_start": (mem.total - mem.used) / MIB,
    }
    with contextlib.suppress(Exception):
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        facts["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
    return facts


FOREIGN_PIDS = (
    "NVML reports process ids from another PID namespace (a container): per-server memory is "
    "unavailable here; the device totals are unaffected"
)


UNREPORTED = "NVML lists a server's process without its memory (not available): per-server memory is unknown"


def gpu_processes(nvml: Any, handle: Any) -> dict[int, Optional[int]]:
    """pid -> used bytes for compute processes on the card; None where NVML does not report them."""
    for name in ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses"):
        fn = getattr(nvml, name, None)
        if fn is not None:
            return {p.pid: None if p.usedGpuMemory is None else int(p.usedGpuMemory) for p in fn(handle)}
    return {}


GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:num_preemptions": "preemptions",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
}


# vLLM's own clocks per request (histograms): their _sum and _count before and after a burst give the
# server's mean for that burst, beside what the client measured.
SERVER_LATENCY = {
    "ttft": "vllm:time_to_first_token_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
}


WANTED_SAMPLES = GAUGES | {
    f"{name}_{part}": f"{short}_{part}" for short, name in SERVER_LATENCY.items() for part in ("sum", "count")
}


# One wanted sample per match: its name (whole), any labels, its value; the page is mostly histogram
# buckets nobody here reads, and matching beats splitting it into lines.
WANTED_LINE = re.compile(
    r"^("
    + "|".join(re.escape(name) for name in sorted(WANTED_SAMPLES, key=len, reverse=True))
    + r")(?:\{.*\})?[ \t]+(\S+)",
    re.MULTILINE,
)


def parse_metrics(text: str) -> dict[str, float]:
    """The wanted samples of a /metrics page (Prometheus text format), summed over label sets."""
    out: dict[str, float] = {}
    for name, value in WANTED_LINE.findall(text):
        key = WANTED_SAMPLES[name]
        out[key] = out.get(key, 0.0) + float(value)
    return out


class MetricsError(RuntimeError):
    pass


def scrape_metrics(url: str, timeout_s: float = 2.5, kept: Optional[Connections] = None) -> dict[str, float]:
    """vLLM's /metrics, its wanted samples; `kept`: sockets kept open across calls (read twice a second)."""
    with contextlib.nullcontext(kept) if kept else Connections() as connections:
        status, body = http_call(connections, "GET", url.rstrip("/") + "/metrics", timeout_s)
    if status != 200:
        raise MetricsError(f"{url}/metrics: HTTP {status}")
    return parse_metrics(body.decode("utf-8", "replace"))


def server_latency_snapshot(
    server: "RunningServer", expect: Optional[dict] = None, finished: int = 0, wait_s: float = 2.0
) -> Optional[dict]:
    """The server's latency histograms' sums and counts now (None if /metrics cannot be read). After a
    burst (`expect`: the snapshot before it), wait until it counted the `finished` requests: it lags a bit."""
    deadline = time.time() + wait_s
    while True:
        try:
            found = scrape_metrics(server.url)
        except Exception:
            return None
        snapshot = {k: v for k, v in found.items() if k.endswith(("_sum", "_count"))}
        counted = snapshot.get("ttft_count", 0.0) - ((expect or {}).get("ttft_count") or 0.0)
        if expect is None or "ttft_count" not in snapshot or counted >= finished or time.time() > deadline:
            return snapshot
        time.sleep(0.05)


# %% GPU memory sampling, part 2: the device series, the slower readers, the thread that writes and counts
# The device series is read in a process of its own: in this one, a burst's hundreds of request threads
# take turns on the interpreter lock, and a sampler thread waiting for its turn lost 0.3-1.6 s of
# samples on an H200 (two lanes in one process). Its lines: "d t used total", "e t error", "m missed".
def device_sampler(module_dir: str, module_name: str, index: int, hz: float) -> None:
    """The device process (shipped with program_source): card `index`'s lines on stdout at `hz` until EOF."""
    import importlib
    import signal
    import sys
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the harness's; EOF stops this
    if module_dir:
        sys.path.insert(0, module_dir)
    nvml = importlib.import_module(module_name)
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    halt = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), halt.set()), daemon=True).start()  # EOF: stop
    device_loop(
        lambda: nvml.nvmlDeviceGetMemoryInfo(handle), sys.stdout.write, sys.stdout.flush, halt, hz, time.time
    )


def next_tick(start: float, interval: float, tick: int, now: float) -> tuple[int, float]:
    """(The tick after `tick`, seconds until it is due), tick k being due at start + k x interval so the rate
    does not drift with the work per tick; ticks already past are skipped, not made up with a burst."""
    import math

    due = max(tick + 1, math.ceil((now - start) / interval))
    return due, max(0.0, start + due * interval - now)


def device_loop(
    read: Callable, write: Callable, flush: Callable, halt: Any, hz: float, clock: Callable
) -> None:
    """A "d t used total" or "e t error" line per tick of next_tick, "m missed" after skipped ticks."""
    interval, start, tick, missed, flushed = 1.0 / hz, clock(), 0, 0, 0.0
    while True:
        now = clock()
        try:
            mem = read()
            write(f"d {now!r} {mem.used} {mem.total}\n")
        except Exception as exc:
            write(f"e {now!r} {exc!r}\n")
        if now - flushed >= 0.2:  # a few lines at a time: the samples carry their own times
            flush()
            flushed = now
        due = tick + 1
        tick, wait_s = next_tick(start, interval, tick, clock())
        if tick > due:
            missed += tick - due
            write(f"m {missed}\n")
        if halt.wait(wait_s):
            break
    flush()


def process_rows(nvml: Any, handle: Any, servers: list, roots: dict, now: float) -> list[dict]:
    """One "process" row per server: the GPU memory of the processes in its tree, as NVML lists them."""
    by_pid = gpu_processes(nvml, handle)
    # NVML lists processes on the card, yet none of them exists in our /proc: we run in a container whose
    # PID namespace hides the host pids NVML reports, and the per-server figures are not known
    foreign = bool(by_pid) and not any(Path(f"/proc/{pid}").exists() for pid in by_pid)
    owners = {pid: owner_of(pid, roots) for pid in by_pid}
    rows = []
    for server in servers:
        pids = [pid for pid, owner in owners.items() if owner is server]
        unreported = [p for p in pids if by_pid[p] is None]
        holders = {str(p): None if p in unreported else by_pid[p] / MIB for p in pids}
        row = {
            "kind": "process",
            "t": now,
            "server": server.spec.name,
            "used_mib": None if unreported else sum(by_pid[p] for p in pids) / MIB,
            "holders_mib": holders,
            "leader_pid": server.proc.pid,
            "gpu_pids": len(by_pid),
        }
        if foreign and not holders:
            row.update(used_mib=None, unattributed=FOREIGN_PIDS)
        elif unreported:
            row.update(unattributed=UNREPORTED)
        rows.append(row)
    return rows


class Sampler(threading.Thread):
    """Device memory at sample_hz (from device_sampler's process); per-server memory, kvcached segments and
    /metrics slower, in a second thread that hands its rows over through a deque, so the writer waits on no
    lock. This thread owns the JSONL file of {"kind": "device"|"process"|"kvcached"|"metrics"|"error"} rows,
    flushed about once a second. Every error is counted, and a row where it can be; sampling goes on."""

    def __init__(
        self,
        nvml: Any,
        gpu_index: int,
        servers: list[RunningServer],
        path: Path,
        sample_hz: float,
        process_sample_hz: float,
    ):
        super().__init__(daemon=True, name="memory-sampler")
        self.nvml, self.gpu_index, self.servers, self.sample_hz = nvml, gpu_index, servers, sample_hz
        self.handle = nvml.nvmlDeviceGetHandleByIndex(gpu_index)
        self.slow_interval = 1.0 / process_sample_hz
        self.clock = time.monotonic  # the slower series' ticks (next_tick)
        self.device: list[tuple[float, float]] = []  # (t, used MiB), read live by wait_settled
        self.missed_ticks = 0  # as the device process counts them
        self.child: Optional[subprocess.Popen] = None  # the device process
        self.child_stderr: Optional[Any] = None  # a file, as a full pipe would block the child
        self.halt = threading.Event()  # not '_stop': that shadows Thread._stop and breaks join()
        self.counted: collections.Counter = collections.Counter()  # kind of error -> errors
        self.lock = threading.Lock()  # over `counted`: both threads count
        self.roots = {server.proc.pid: server for server in servers}  # every server's tree hangs below one
        self.handed_over: collections.deque = collections.deque()  # slow thread -> file writer
        self.path, self.file = path, None  # memory.jsonl, opened at the first write
        self.slow_thread = threading.Thread(target=self._slow_loop, daemon=True, name="memory-sampler-slow")

    @property
    def error_kinds(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counted)

    @property
    def errors(self) -> int:
        return sum(self.error_kinds.values())

    def count_error(self, kind: str) -> None:
        with self.lock:
            self.counted[kind] += 1

    def error_row(self, kind: str, t: float, error: str, source: str = "") -> dict:
        """Counts one error of `kind` and returns its row (source: where, when more than the kind)."""
        self.count_error(kind)
        return {"kind": "error", "t": t, "source": source or kind, "error": error}

    def start(self, first_sample_timeout_s: float = 20.0) -> None:
        """Start sampling; returns once the first device sample is in (or raises, saying why not)."""
        module = getattr(self.nvml, "__file__", None) or ""
        where = os.path.dirname(os.path.dirname(module) if module.endswith("__init__.py") else module)
        call = f"device_sampler({where!r}, {self.nvml.__name__!r}, {self.gpu_index}, {self.sample_hz!r})"
        self.child_stderr = tempfile.TemporaryFile(mode="w+")
        # -S: it needs the standard library and the NVML module's folder only; site's .pth files cost a start
        self.child = subprocess.Popen(
            [sys.executable, "-S", "-c", program_source(next_tick, device_loop, device_sampler, call=call)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.child_stderr,
            text=True,
            bufsize=1,
        )
        super().start()
        deadline = time.time() + first_sample_timeout_s
        try:
            while not self.device and time.time() < deadline and self.child.poll() is None:
                time.sleep(0.01)
        except BaseException:  # a stop meanwhile: in a notebook the process and threads would go on for good
            self.child.kill()
            self.stop()
            raise
        if self.device:
            return
        self.child.kill()  # a no-op if it exited
        self.child.wait()
        self.child_stderr.seek(0)
        said = [line.strip() for line in self.child_stderr.read().splitlines() if line.strip()]
        self.stop()
        raise RuntimeError(
            f"the device-memory sampler did not start within {first_sample_timeout_s:.0f} s"
            + (f" (it exited: {said[-1][:300]})" if said else "")
        )

    def device_rows(self, line: str) -> list[dict]:
        """The memory.jsonl rows of a device process line: "d t used total", "e t error" or "m missed"."""
        kind, _, rest = line.rstrip("\n").partition(" ")
        try:
            if kind == "d":
                t, used, total = rest.split()
                at, used_mib = float(t), int(used) / MIB
                self.device.append((at, used_mib))
                return [{"kind": "device", "t": at, "used_mib": used_mib, "total_mib": int(total) / MIB}]
            if kind == "e":
                t, _, error = rest.partition(" ")
                return [self.error_row("nvml", float(t), error)]
            if kind == "m":
                self.missed_ticks = int(rest)
        except ValueError:
            self.count_error("sampler")
        return []

    def run(self) -> None:
        self.slow_thread.start()
        last_flush = time.time()
        for line in self.child.stdout:  # until the device process ends
            rows = self.device_rows(line)
            while self.handed_over:
                rows += self.handed_over.popleft()
            flush = time.time() - last_flush >= 1.0
            self.write(rows, flush)
            if flush:
                last_flush = time.time()
        if not self.halt.is_set():  # it died on its own: the series ends here, and the summary says so
            self.count_error("device sampler exited")
        self.halt.set()
        self.slow_thread.join(timeout=5)
        self.write([row for batch in list(self.handed_over) for row in batch], flush=True)
        self.close_file()

    def write(self, rows: list[dict], flush: bool = False) -> None:
        """An OSError (a full disk, too many open files) is counted; the next write opens the file again."""
        try:
            if rows:
                self.file = self.file or open(self.path, "a")
                self.file.write("".join(json.dumps(row) + "\n" for row in rows))
            if flush and self.file is not None:
                self.file.flush()
        except OSError:
            self.close_file()
            self.count_error("write")

    def close_file(self) -> None:
        with contextlib.suppress(OSError):
            if self.file is not None:
                self.file.close()
        self.file = None

    def stop(self) -> None:
        """Ends the device process (at EOF on its stdin, or killed after 5 s), then this thread."""
        self.halt.set()
        if self.child is not None:
            with contextlib.suppress(OSError):
                self.child.stdin.close()
            try:
                self.child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
        if self.is_alive():
            self.join(timeout=10)
        if self.child_stderr is not None:
            self.child_stderr.close()

    def slow_rows(self, now: float) -> list[dict]:
        """Per-server memory and kvcached segments; a failed read is an error row."""
        try:
            rows = process_rows(self.nvml, self.handle, self.servers, self.roots, now)
        except Exception as exc:
            rows = [self.error_row("nvml-processes", now, repr(exc))]
        for server in [server for server in self.servers if server.spec.kvcached]:
            try:
                seg = read_segment(server.spec.ipc_name)  # None before kvcached has made it
                rows += [{"kind": "kvcached", "t": now, "server": server.spec.name, **seg}] if seg else []
            except OSError as exc:
                where = f"kvcached {server.spec.name}"
                rows.append(self.error_row("kvcached segment", now, repr(exc)[:300], where))
        return rows

    def metrics_rows(self, kept: Connections) -> list[dict]:
        """Each server's /metrics (kept: its open connections, see scrape_metrics)."""
        rows = []
        for server in self.servers:
            now = time.time()
            try:
                found = scrape_metrics(server.url, kept=kept)
                rows.append({"kind": "metrics", "t": now, "server": server.spec.name, **found})
            except Exception as exc:
                rows.append(self.error_row("metrics", now, repr(exc)[:300], f"metrics {server.spec.name}"))
        return rows

    def _slow_loop(self) -> None:
        kept = Connections()  # one kept-alive connection per server, not one per scrape
        start, tick = self.clock(), 0
        try:
            while True:
                try:
                    self.handed_over.append(self.slow_rows(time.time()) + self.metrics_rows(kept))
                except Exception:
                    self.count_error("sampler")
                tick, wait_s = next_tick(start, self.slow_interval, tick, self.clock())
                if self.halt.wait(wait_s):
                    break
        finally:
            kept.close()


def wait_settled(sampler: "Sampler", idle: Optional[float], cfg: "Config") -> str:
    """Until the sampler's live device samples are back within --release-tolerance of idle, or flat
    for --settle-s, or --release-timeout-s: waiting for the event itself instead of a fixed sleep."""
    start, settle_s = time.time(), cfg.settle_s
    while time.time() - start < cfg.release_timeout_s:
        cutoff = time.time() - settle_s  # the last settle_s of samples taken since the wait began
        window = [s for s in list(sampler.device) if s[0] >= cutoff and s[0] > start]
        if window and idle is not None and window[-1][1] <= idle * (1 + cfg.release_tolerance):
            return "released"
        if time.time() - start >= settle_s and window:
            values = [v for _, v in window]
            if max(values) - min(values) <= max(16.0, 0.005 * max(values)):
                return "settled"
        pause(0.1)
    return "timeout"


def sleep_idle_window(seconds: float) -> Span:
    """Sleep with no requests in flight; the (start, end) over which an idle level is taken."""
    start = time.time()
    pause(seconds)
    return (start, time.time())


# %% Load generation: one streaming request function that never raises
@dataclasses.dataclass
class RequestRecord:
    """One request from the wire to the summary: what send_chat measured, written to requests.jsonl by
    record_row and read back by from_row; every latency figure is read from here."""

    experiment: str
    server: str  # slot: 'A', 'B', ...
    phase: str  # which step of the schedule (e.g. 'A burst 2')
    repeat: int
    burst: int
    index: int
    t_send: float  # wall clock (s since epoch)
    ok: bool = False  # completed: [DONE] seen, a finish_reason, no error event
    status: Optional[int] = None  # HTTP status, None if no response
    error: Optional[str] = None  # why it failed: the one failure reason the summaries count
    ttft_s: Optional[float] = None  # send -> first content chunk (its arrival at this machine)
    e2e_s: Optional[float] = None  # send -> end of stream (or failure)
    itl_s: list = dataclasses.field(default_factory=list)  # gaps between content chunks
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish_reason: Optional[str] = None
    content_reads: Optional[int] = 0  # network reads with content (1: not streamed); None in older rows
    send_delay_s: Optional[float] = None  # open loop: how late the client sent it after its planned arrival
    planned_prompt_tokens: Optional[int] = None  # trace: the prompt length the trace asked for

    @property
    def tpot_s(self) -> Optional[float]:
        """Time per output token after the first, of a completed request of two tokens or more."""
        if not self.ok or self.ttft_s is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    @classmethod
    def from_row(cls, row: dict) -> RequestRecord:
        """A requests.jsonl row read back; a key an older row lacks reads as None. Its tpot_s is derived
        again, from the row's rounded times, as the committed summaries were."""
        values = {name: row.get(name) for name in REQUEST_FIELDS}
        values.update(ok=bool(values["ok"]), itl_s=values["itl_s"] or [])
        return cls(**values)


REQUEST_FIELDS = [f.name for f in dataclasses.fields(RequestRecord)]


def as_records(rows: Iterable[RequestRecord | dict]) -> list[RequestRecord]:
    return [r if isinstance(r, RequestRecord) else RequestRecord.from_row(r) for r in rows]


def grouped(records: Iterable[RequestRecord], *fields: str) -> dict[tuple, list[RequestRecord]]:
    """The records by their values of `fields`, in order of first appearance (one pass)."""
    groups: dict[tuple, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(tuple(getattr(r, f) for f in fields), []).append(r)
    return groups


def note_event(record: RequestRecord, event: dict) -> int:
    """Copy one stream event's error, usage and finish reason into `record`; how many choices had content."""
    error = event.get("error")
    if error:  # vLLM reports a failure inside an HTTP 200 stream
        message = error.get("message", error) if isinstance(error, dict) else error
        record.error = f"error event in stream: {str(message)[:300]}"
    if event.get("usage"):
        record.prompt_tokens = event["usage"].get("prompt_tokens")
        record.completion_tokens = event["usage"].get("completion_tokens")
    contents = 0
    for choice in event.get("choices") or ():
        record.finish_reason = choice.get("finish_reason") or record.finish_reason
        delta = choice.get("delta") or {}
        contents += any(delta.get(key) for key in STREAMED_TEXT)
    return contents


# A token is text in any of these: with --reasoning-parser, vLLM streams a model's thinking as `reasoning`
# (`reasoning_content` before 0.12), and its first tokens are the first ones a user waits for
STREAMED_TEXT = ("content", "reasoning", "reasoning_content")


def ending_every_line(reads: Iterator[tuple[float, bytes]]) -> Iterator[tuple[float, bytes]]:
    """The reads, then a newline at the last one's time: a stream's last line may come without its own."""
    now = None
    for now, data in reads:
        yield now, data
    if now is not None:
        yield now, b"\n"


def read_sse(reads: Iterator[tuple[float, bytes]], record: RequestRecord, start: float) -> bool:
    """Consume an SSE stream into `record`, each content chunk timed on the arrival of its network read
    (one JSON parse per read); True once `data: [DONE]` arrived."""
    last_token, partial = None, b""
    for now, data in ending_every_line(reads):
        *lines, partial = (partial + data).split(b"\n")
        payloads = [line[5:].strip() for line in lines if line.startswith(b"data:") and line[5:].strip()]
        done = b"[DONE]" in payloads
        payloads = payloads[: payloads.index(b"[DONE]")] if done else payloads
        had_content = False
        for event in json.loads(b"[" + b",".join(payloads) + b"]") if payloads else ():
            for _ in range(note_event(record, event)):
                if record.ttft_s is None:
                    record.ttft_s = now - start
                else:
                    record.itl_s.append(now - last_token)
                last_token, had_content = now, True
        record.content_reads += had_content
        if done:
            record.e2e_s = now - start
            return True
    return False


def completion_problem(record: RequestRecord, done: bool, max_tokens: int, ignore_eos: bool) -> Optional[str]:
    """Why a streamed response does not count as completed, or None if it does."""
    if record.error:
        return record.error
    if not done:
        return "stream closed before [DONE]"
    if record.ttft_s is None:
        return "stream ended without any content"
    if not record.finish_reason:
        return "stream ended without a finish_reason"
    if record.finish_reason in ("abort", "error"):  # vLLM's engine ended it, e.g. a request it had to drop
        return f"finish_reason {record.finish_reason}"
    if ignore_eos and record.completion_tokens != max_tokens:
        return f"{record.completion_tokens} of {max_tokens} tokens despite ignore_eos"
    return None


DRAIN_S = 0.05  # after [DONE], how long the end of the body may take to come, so that its socket is reused


def stream_chat(
    connections: Connections,
    url: str,
    body: dict,
    api_key: str,
    record: RequestRecord,
    start: float,
    timeout_s: float,
    ready: Optional[float] = None,
) -> bool:
    """POST and read the stream into `record` until start + timeout_s; True once [DONE] arrived. A closed
    burst's request was ready to go at `ready`: its own work from there to its send is not the server's."""
    request = http_request("POST", url, json.dumps(body).encode(), api_key)
    with exchange(connections, url, request, start + timeout_s) as (wire, status, headers):
        if ready is not None:
            own_work = wire.sent - ready
            start, record.t_send = start + own_work, record.t_send + own_work
        record.status, reads = status, wire.body(headers)
        if record.status != 200:
            text = b"".join(data for _, data in reads).decode("utf-8", "replace")
            record.error = f"HTTP {record.status}: {text[:300]}"
            return False
        done = read_sse(reads, record, start)
        if done and not wire.complete:  # the end of the body comes just after [DONE]: wait a moment
            wire.deadline = min(wire.deadline, time.perf_counter() + DRAIN_S)
            with contextlib.suppress(Exception):  # not in time, or cut off: the socket is just not reused
                collections.deque(reads, maxlen=0)
        return done


def send_chat(
    base_url: str,
    model: str,
    request: PlannedRequest,
    record: RequestRecord,
    api_key: str = "",
    timeout_s: float = 300.0,
    ignore_eos: bool = False,
    connections: Optional[Connections] = None,
    gate: Optional["WakeGate | RouterGate"] = None,
    arrival: Optional[tuple[float, float]] = None,
) -> RequestRecord:
    """Stream one chat completion; every outcome, failures included, ends up in `record`. timeout_s is
    absolute: cut at send + timeout_s. `gate` runs after the clock starts, before sending (a router waking a
    sleeping server). `arrival` = (perf_counter, wall clock) of a planned open-loop arrival: the clock starts
    there, so a request sent late counts its wait; a closed burst's at its send, plus the gate's wait."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **({"ignore_eos": True} if ignore_eos else {}),
    }
    url = f"{base_url}/v1/chat/completions"
    start, record.t_send = arrival or (time.perf_counter(), time.time())
    sent_at, entered = record.t_send, False
    try:
        if arrival is not None:  # before the gate: a wake-up is the router's wait, not the client's lateness
            record.send_delay_s = time.perf_counter() - start
        if gate is not None:
            gate()
            entered = True
        ready = None if arrival else time.perf_counter()
        with contextlib.nullcontext(connections) if connections else Connections() as wires:
            done = stream_chat(wires, url, body, api_key, record, start, timeout_s, ready)
        record.error = completion_problem(record, done, request.max_tokens, ignore_eos)
        record.ok = record.error is None
    except Exception as exc:  # a failure is a row, never the end of the experiment
        record.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        timed_out = time.perf_counter() >= start + timeout_s
        if timed_out and (entered or gate is None):  # a gate's own error (the router's) says why
            record.error = f"timed out: no complete response within {timeout_s:g} s (--request-timeout-s)"
    finally:
        if not record.ok:  # from the send stream_chat moved t_send to; a completed stream ends at [DONE]
            record.e2e_s = time.perf_counter() - start - (record.t_send - sent_at)
        if entered:
            gate.release()
    return record


class RecordSink:
    """Appends each request's row the moment it finishes, so an interrupted burst loses nothing done."""

    def __init__(self, path: Path, keep_itl: bool = True):
        self.path, self.keep_itl, self.lock = path, keep_itl, threading.Lock()
        self.closed = False

    def __call__(self, record: RequestRecord) -> None:
        with self.lock:
            if not self.closed:
                write_jsonl(self.path, [record_row(record, self.keep_itl)])

    def close(self) -> None:
        """No row from here on: a stop cuts off the requests in flight, not the servers' failures."""
        with self.lock:
            self.closed = True


BURST_DEADLINE_SLACK_S = 30.0  # past every request's own deadline: connect time, thread start-up
# open loop: requests in flight at most, per model; one arriving past that waits, and its wait counts
OPEN_LOOP_THREADS = 1024


def burst_threads(requests_: list[PlannedRequest]) -> int:
    """Requests in flight at once: a whole closed burst; open loop, at most OPEN_LOOP_THREADS."""
    return min(len(requests_), OPEN_LOOP_THREADS) if is_open_loop(requests_) else len(requests_)


def is_open_loop(requests_: list[PlannedRequest]) -> bool:
    """Requests at planned offsets (the first may arrive at 0.0), not a closed burst sent at once."""
    return any(r.offset_s for r in requests_)


def await_arrival(
    request: PlannedRequest, started: tuple[float, float], open_loop: bool, halt: threading.Event
) -> Optional[tuple[float, float]]:
    """Open loop: wait until its planned arrival (or a halt), returned as (perf_counter, wall clock); closed:
    None."""
    if not open_loop:
        return None
    halt.wait(max(0.0, started[0] + request.offset_s - time.perf_counter()))
    return started[0] + request.offset_s, started[1] + request.offset_s


def await_burst(
    futures: list, started: float, deadline: float, progress_every_s: float, server: RunningServer
) -> Optional[str]:
    """Until all requests are done, the deadline passes or the server's keeper ends (it may hold them open
    until they time out, so they are not waited for); the error of the requests still open, if any."""
    next_progress = started + progress_every_s
    while True:
        done, pending = concurrent.futures.wait(futures, timeout=min(1.0, max(0.0, deadline - time.time())))
        code = server.exit_code()
        if not pending:
            return None
        if code is not None:
            return f"still open: server {server.spec.label} {exit_words(code)} during the burst"
        if time.time() >= deadline:
            return f"still open at the burst's deadline ({deadline - started:.0f} s)"
        if time.time() >= next_progress:
            waited = f"{len(done)}/{len(futures)} requests done after {time.time() - started:.0f} s"
            say(f"      ... {waited}{kv_wait_hint(server)}")
            next_progress += progress_every_s


def run_burst(
    server: RunningServer,
    requests_: list[PlannedRequest],
    make_record: Callable[..., RequestRecord],
    cfg: Config,
    progress_every_s: float = 10.0,
    sink: Optional[Callable[[RequestRecord], None]] = None,
    gate: Optional["WakeGate | RouterGate"] = None,
    halt: Optional[threading.Event] = None,
) -> list[RequestRecord]:
    """A burst's requests at once (open loop: each at its offset); the deadline fails what is still open. A
    halt sends no more: the requests not sent by then are left out."""
    threads = burst_threads(requests_)
    connections = Connections()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="request")
    records = [make_record(r) for r in requests_]
    delivered, lock, closed = set(), threading.Lock(), False

    def deliver(i: int, record: RequestRecord) -> None:  # each request's row exactly once
        with lock:
            if i not in delivered and not closed:
                delivered.add(i)
                if sink is not None:
                    sink(record)

    def send(i: int, arrival: Optional[tuple[float, float]]) -> concurrent.futures.Future:
        args = (server.url, server.spec.model, requests_[i], records[i], cfg.api_key, cfg.request_timeout_s)
        future = pool.submit(send_chat, *args, cfg.ignore_eos, connections, gate, arrival)
        # send_chat fills records[i]; a request cancelled by a stop is not delivered (closed by then)
        future.add_done_callback(lambda f: deliver(i, records[i]))
        return future

    open_loop = is_open_loop(requests_)
    if not open_loop:  # a closed burst: its TTFTs do not count the connects
        with contextlib.suppress(OSError):  # a server that refuses is each request's failure, below
            connections.open_ahead(server.url, threads)
    started = (time.perf_counter(), time.time())
    last_arrival = max((r.offset_s for r in requests_), default=0.0)
    deadline = started[1] + last_arrival + cfg.request_timeout_s + BURST_DEADLINE_SLACK_S
    halt = halt or threading.Event()
    try:
        arrivals = (await_arrival(r, started, open_loop, halt) for r in requests_)  # each waits its time
        futures = [
            send(i, at) for i, at in enumerate(itertools.takewhile(lambda _: not halt.is_set(), arrivals))
        ]
        error = await_burst(futures, started[1], deadline, progress_every_s, server)
        out = [
            f.result() if f.done() else still_open(rec, started[1] + r.offset_s, error)
            for f, rec, r in zip(futures, records, requests_)
        ]
        for i, record in enumerate(out):  # wait() can return before the done-callbacks ran
            deliver(i, record)
        return out
    finally:
        # On Ctrl-C, don't wait for open streams: the servers are stopped next, and the requests that
        # stop cuts off are not the server's failures, so nothing more is recorded from here on.
        with lock:
            closed = True
        pool.shutdown(wait=False, cancel_futures=True)
        connections.close()


def still_open(record: RequestRecord, planned_send: float, error: Optional[str]) -> RequestRecord:
    """A copy of an unfinished request's record, failed with `error` as its burst ended, timed from its send
    (from its planned arrival if it never went out)."""
    t_send = record.t_send or planned_send
    return dataclasses.replace(
        record, ok=False, itl_s=list(record.itl_s), t_send=t_send, e2e_s=time.time() - t_send, error=error
    )


# %% Files: raw rows appended as they come, JSON replaced whole
def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def write_text_atomic(path: Path, text: str) -> None:
    """Readers (and a crash, or a full disk) see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(scrub(text))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(to_json(obj), indent=2))


class ResultsUnwritable(RuntimeError):
    """The run folder takes no more writes (a full disk, a quota, a read-only mount): the run stops."""


UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@contextlib.contextmanager
def stopped_if_unwritable(run_dir: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        raise ResultsUnwritable(
            f"cannot write in {run_dir} ({exc.strerror}): the run stopped, every server with it; what was "
            f"recorded is there: free some space, then build its report with --report {run_dir}"
        ) from None


def write_failure(exp_dir: Path, entry: Experiment, error: str, trace: str = "") -> None:
    """error.json in the experiment's folder, and the line that says so."""
    with stopped_if_unwritable(exp_dir.parent):
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_json(exp_dir / "error.json", {"experiment": entry.name, "error": error, "traceback": trace})
    say(f"  FAILED {entry.name}: {error}")


CSV_COLUMNS = (
    "experiment server phase repeat burst index t_send ok status error ttft_s tpot_s e2e_s prompt_tokens "
    "completion_tokens finish_reason itl_p50_s itl_max_s"
).split()


def write_requests_csv(path: Path, rows: list[dict]) -> None:
    """requests.jsonl as one spreadsheet row per request (the token gaps summarised)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        gaps = row.get("itl_s") or []
        writer.writerow({**row, "itl_p50_s": percentile(gaps, 50), "itl_max_s": max(gaps, default=None)})
    write_summary(path, out.getvalue())


def open_jsonl(path: Path) -> Optional[Any]:
    """A JSONL file, or its gzipped copy (committed runs are compressed), open to read; None if neither is."""
    packed = path.with_name(path.name + ".gz")
    if path.exists():
        return open(path, errors="replace")  # a damaged byte spoils its line, not the file
    return gzip.open(packed, "rt", errors="replace") if packed.exists() else None


def read_jsonl(path: Path, problems: Optional[list[str]] = None, expected: bool = False) -> list[dict]:
    """Rows of a JSONL file, or of its gzipped copy. Lines that do not read, and the file missing where
    it was `expected`, are said in `problems`."""
    said: list[str] = problems if problems is not None else []
    chunks = []
    try:
        opened = open_jsonl(path)
        if opened is None:
            if expected:
                said.append(f"{path.name} is missing: none of its rows is reported")
            return []
        with opened:
            while chunk := opened.read(1 << 13):  # small: a gzip cut short keeps what is before the cut
                chunks.append(chunk)
    except (OSError, EOFError) as exc:  # a folder in its place, a gzip cut short: what was read counts
        said.append(f"{path.name} could not be read to its end ({exc}): the rows before are reported")
    lines = [line for line in "".join(chunks).splitlines() if line.strip()]
    try:  # one parse of the whole file: a fifth faster
        rows = json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        rows = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):  # a run killed mid-write leaves a torn line
                rows.append(json.loads(line))
    rows = [row for row in rows if isinstance(row, dict)]
    if len(rows) < len(lines):
        said.append(f"{path.name}: {len(lines) - len(rows)} of {len(lines)} lines could not be read (torn)")
    return rows


REQUEST_KEYS = {"server": str, "phase": str, "repeat": int, "burst": int, "t_send": (int, float)}
NUMBER_OR_NONE = (int, float, type(None))
MEASURED_KEYS = dict.fromkeys(
    "ttft_s e2e_s prompt_tokens completion_tokens send_delay_s".split(), NUMBER_OR_NONE
)


def request_rows(rows: list[dict], problems: list[str]) -> list[dict]:
    """The rows that are requests: another file's lines, or a row edited out of shape, are left out, said."""
    kept = [
        row
        for row in rows
        if all(isinstance(row.get(k), kind) for k, kind in REQUEST_KEYS.items())
        and all(isinstance(row[k], kind) for k, kind in MEASURED_KEYS.items() if k in row)
    ]
    if len(kept) < len(rows):
        problems.append(
            f"requests.jsonl: {len(rows) - len(kept)} of {len(rows)} rows are not requests (a "
            f"{', '.join(REQUEST_KEYS)} missing or of the wrong kind, or a measure no number), left out"
        )
    return kept


def record_row(record: RequestRecord, keep_itl: bool = True) -> dict:
    """A request's requests.jsonl row: its fields, then its TPOT, times rounded to keep the file small."""
    row = {**{name: getattr(record, name) for name in REQUEST_FIELDS}, "tpot_s": record.tpot_s}
    for key in ("ttft_s", "e2e_s", "tpot_s"):
        if row[key] is not None:
            row[key] = round(row[key], 6)  # microseconds are plenty
    row["itl_s"] = [round(v, 5) for v in record.itl_s] if keep_itl else []
    return row


# %% Metrics: pure functions of saved records
Samples = list[tuple[float, float]]  # (time, value) pairs in time order: a memory series
NOT_STREAMED = (
    "the server did not stream (each response arrived in one piece): "
    "time to first token and per-token time cannot be measured"
)
FAITHFUL_SEND_DELAY_S = 0.05  # open loop: a send-delay p99 above this means the client fell behind


def percentiles(values: Iterable[Optional[float]], qs: list[float]) -> list[Optional[float]]:
    """Linear-interpolated percentiles (q in 0..100) of the finite values, in one pass; None for no data."""
    if not isinstance(values, np.ndarray):  # an array has no None to drop (iterating one is slow)
        values = np.asarray([v for v in values if v is not None], dtype=float)
    finite = values[np.isfinite(values)]
    return [float(p) for p in np.percentile(finite, qs)] if finite.size else [None] * len(qs)


def percentile(values: Iterable[Optional[float]], q: float) -> Optional[float]:
    return percentiles(values, [q])[0]


@dataclasses.dataclass
class Distribution:
    n: int
    p50: Optional[float]
    p90: Optional[float]
    p99: Optional[float]
    mean: Optional[float]
    max: Optional[float]

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> Distribution:
        data = np.array(values if isinstance(values, list) else list(values), dtype=float)  # None -> nan
        data = data[~np.isnan(data)]
        if not data.size:
            return cls(0, None, None, None, None, None)
        return cls(data.size, *percentiles(data, [50, 90, 99]), float(data.mean()), float(data.max()))


@dataclasses.dataclass
class LatencySummary:
    requests: int
    ok: int
    failed: int
    errors: dict[str, int]  # first 80 characters of each failure reason -> count
    ttft_s: Distribution
    tpot_s: Distribution
    e2e_s: Distribution
    output_tokens: int
    prompt_tokens_mean: Optional[float]
    output_tokens_per_s: Optional[float]
    ttft_note: Optional[str] = omitted_if_none()  # why there is no TTFT (the server did not stream)
    itl_s: Optional[Distribution] = omitted_if_none()  # every gap between content chunks, pooled
    goodput: Optional[Goodput] = omitted_if_none()  # with --slo-ttft-ms / --slo-tpot-ms
    send_delay_s: Optional[Distribution] = omitted_if_none()  # open loop: actual send - planned arrival

    def quantile(self, metric: str, q: str) -> Optional[float]:
        return getattr(getattr(self, metric), q)

    def quantiles(self) -> list[Optional[float]]:
        """Its LATENCY_KEYS figures, in that order."""
        return [self.quantile(m, q) for m, q in LATENCY_KEYS]


@dataclasses.dataclass
class Goodput:
    """Requests that completed within the service-level objectives; failed ones count as missing them."""

    slo_ttft_ms: Optional[float]
    slo_tpot_ms: Optional[float]
    met: int
    of: int
    share: Optional[float]


def goodput(
    records: Iterable[RequestRecord | dict], slo_ttft_ms: float, slo_tpot_ms: float, streamed: bool = True
) -> Optional[Goodput]:
    """Requests within the SLOs; None without SLOs, or where responses did not stream (no TTFT, no TPOT)."""
    if not (slo_ttft_ms or slo_tpot_ms) or not streamed:
        return None
    records = as_records(records)

    def meets(r: RequestRecord) -> bool:
        late_first = slo_ttft_ms and (r.ttft_s is None or r.ttft_s * 1000 > slo_ttft_ms)
        slow_rest = slo_tpot_ms and r.tpot_s is not None and r.tpot_s * 1000 > slo_tpot_ms
        return r.ok and not late_first and not slow_rest

    met = sum(meets(r) for r in records)
    return Goodput(slo_ttft_ms or None, slo_tpot_ms or None, met, len(records), ratio(met, len(records)))


def latency_summary(
    records: Iterable[RequestRecord | dict], slo: tuple[float, float] = (0.0, 0.0)
) -> LatencySummary:
    """TTFT, TPOT, ITL and E2E percentiles, throughput, errors and goodput (slo: TTFT ms, TPOT ms)."""
    records = as_records(records)
    ok = [r for r in records if r.ok]
    # streamed unless most multi-token responses came in one read, where a "TTFT" would be the E2E time
    # (rows from before content_reads: streamed)
    multi = [r for r in ok if (r.completion_tokens or 0) >= 2 and r.content_reads is not None]
    streamed = not multi or sum(r.content_reads < 2 for r in multi) <= len(multi) / 2
    ends = [r.t_send + (r.e2e_s or 0) for r in records]
    span = max(ends, default=0) - min((r.t_send for r in records), default=0)  # no records: 0, no throughput
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    gaps = list(itertools.chain.from_iterable(r.itl_s for r in ok)) if streamed else []
    delays = [r.send_delay_s for r in records if r.send_delay_s is not None]  # open loop only
    return LatencySummary(
        requests=len(records),
        ok=len(ok),
        failed=len(records) - len(ok),
        errors=dict(collections.Counter((r.error or "unknown")[:80] for r in records if not r.ok)),
        ttft_s=Distribution.of(r.ttft_s for r in ok if streamed),
        tpot_s=Distribution.of(r.tpot_s for r in ok if streamed),
        e2e_s=Distribution.of(r.e2e_s for r in ok),
        output_tokens=out_tokens,
        prompt_tokens_mean=mean(r.prompt_tokens for r in ok),  # None where no response said
        output_tokens_per_s=(out_tokens / span) if span else None,
        ttft_note=None if streamed else NOT_STREAMED,
        itl_s=Distribution.of(gaps) if gaps else None,
        goodput=goodput(records, *slo, streamed=streamed),
        send_delay_s=Distribution.of(delays) if delays else None,
    )


def unfaithful(latency: LatencySummary) -> list[str]:
    """The problem to report when requests went out well after their planned arrivals."""
    late = latency.send_delay_s
    if late is None or late.p99 is None or late.p99 <= FAITHFUL_SEND_DELAY_S:
        return []
    return [
        f"not faithful to its plan: requests went out a p99 of {late.p99 * 1000:,.0f} ms after their planned "
        f"arrival (above {FAITHFUL_SEND_DELAY_S * 1000:.0f} ms): the client fell behind, and the latencies "
        "include its lateness"
    ]


def window_samples(samples: Samples, span: Optional[Span]) -> Samples:
    return [] if span is None else [(t, v) for t, v in samples if span[0] <= t <= span[1]]


def window_median(samples: Samples, start: float, end: float) -> Optional[float]:
    return percentile((v for t, v in samples if start <= t <= end), 50)


@dataclasses.dataclass
class MemorySummary:
    idle_after_load_mib: Optional[float]  # right after the servers came up
    idle_before_workload_mib: Optional[float]  # after the warm-up: the level the bursts start from
    peak_mib: Optional[float]
    flex_mib: Optional[float]  # peak - idle before the workload
    # after the last burst, until a device sample is back within tolerance of idle (0: it never rose above)
    release_s: Optional[float]
    residual_mib: Optional[float]  # where it ended, above idle before the workload
    # kvcached keeps pre-allocated pages after its first burst: the level it settles at can sit above
    # the level right after loading
    residual_vs_load_mib: Optional[float]

    @classmethod
    def void(cls) -> MemorySummary:
        return cls(*[None] * len(dataclasses.fields(cls)))


def memory_summary(samples: Samples, marks: Marks, tolerance: float) -> MemorySummary:
    idle_load = window_median(samples, *marks.idle_after_load) if marks.idle_after_load else None
    idle = window_median(samples, *marks.idle_before) if marks.idle_before else idle_load
    if marks.workload is None:
        return MemorySummary(idle_load, idle, None, None, None, None, None)
    start, end = marks.workload
    peak = max((v for _, v in window_samples(samples, (start, marks.sampling_end or end))), default=None)
    last = next((v for t, v in reversed(samples) if t >= end), None)
    limit = None if idle is None else idle * (1 + tolerance)  # back within tolerance of idle
    back = next((t for t, v in samples if t >= end and limit is not None and v <= limit), None)
    if peak is not None and limit is not None and peak <= limit:
        back = end  # never above the band: nothing to give back, whether or not a sample came after it
    return MemorySummary(
        idle_after_load_mib=idle_load,
        idle_before_workload_mib=idle,
        peak_mib=peak,
        flex_mib=diff(peak, idle),
        release_s=diff(back, end),
        residual_mib=diff(last, idle),
        residual_vs_load_mib=diff(last, idle_load),
    )


@dataclasses.dataclass
class MemoryCost:
    """Memory held over the workload (a peak alone hides how long it was held); gib_hours: mean x length."""

    workload_s: float
    mean_mib: float  # weighted by time between samples
    p95_mib: Optional[float]
    peak_mib: float
    gib_hours: float


def serving_span(marks: "Marks") -> Optional[Span]:
    """The workload, through the sleep arm's last fall-asleep: the earlier ones fall within the workload, so
    each burst's is counted (its release is timed from the workload's end all the same)."""
    if marks.workload is None:
        return None
    last = marks.bursts[-1] if marks.bursts else None
    asleep = marks.asleep or (last and last.end and last.sleep_s and last.end + last.sleep_s) or 0.0
    return marks.workload[0], max(marks.workload[1], asleep)


def memory_cost(samples: Samples, workload: Optional[Span]) -> Optional[MemoryCost]:
    """The memory cost of (t, MiB) samples over the workload; None without two samples in it. Its ends
    count too, each at the level of the sample in it nearest to that end: the workload begins as its first
    requests go out and ends as its last one does, so a sample outside it reads another level."""
    inside = np.asarray(window_samples(samples, workload), dtype=float)
    if len(inside) < 2 or inside[-1, 0] <= inside[0, 0]:
        return None
    start, end = workload
    times = np.concatenate(([start], inside[:, 0], [end]))
    levels = np.concatenate(([inside[0, 1]], inside[:, 1], [inside[-1, 1]]))
    mean = float(((levels[1:] + levels[:-1]) / 2 * np.diff(times)).sum() / (end - start))
    mib = inside[:, 1]
    return MemoryCost(
        end - start, mean, percentile(mib, 95), float(mib.max()), mean / 1024 * (end - start) / 3600
    )


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return (a / b) if a is not None and b not in (None, 0) else None


def diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return (a - b) if a is not None and b is not None else None


@dataclasses.dataclass
class Spread:
    median: Optional[float]
    min: Optional[float]
    max: Optional[float]
    n: int

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Spread":
        data = [v for v in values if v is not None]
        return cls(percentile(data, 50), min(data, default=None), max(data, default=None), len(data))


# %% Summaries, part 1: a run's raw files loaded (only they count, so --report can rebuild offline)
def series(
    rows: list[dict], kind: str, field: str = "used_mib", server: Optional[str] = None, scale: float = 1.0
) -> Samples:
    return [
        (r["t"], r[field] * scale)
        for r in rows
        if r.get("kind") == kind and r.get(field) is not None and server in (None, r.get("server"))
    ]


class ReportError(RuntimeError):
    """--report pointed at something that is not a run folder."""


def read_json(path: Path) -> tuple[Any, Optional[str]]:
    """(contents, None), or (None, why it could not be read) for a missing, empty or torn file."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except (OSError, ValueError) as exc:
        return None, f"{path.name} unreadable ({type(exc).__name__}: {str(exc)[:120]})"


@dataclasses.dataclass
class LoadedExperiment:
    """One experiment folder, read once: its record and raw rows."""

    path: Path
    record: ExperimentRecord
    memory: list[dict]  # memory.jsonl rows
    requests: list[dict]  # requests.jsonl rows
    problems: list[str]  # what could not be read

    @functools.cached_property  # the summaries read them many times over, by server, phase and repeat
    def records(self) -> list[RequestRecord]:
        return as_records(self.requests)

    @functools.cached_property  # read by the marks, the summary and the plots alike
    def device(self) -> Samples:
        return series(self.memory, "device")

    @property
    def t0(self) -> float:
        """Time zero of its plots; an interrupted experiment may lack its marks."""
        if self.record.marks.idle_after_load:
            return self.record.marks.idle_after_load[0]
        return min((r["t"] for r in self.memory if "t" in r), default=0.0)


def load_experiment(exp_dir: Path) -> LoadedExperiment:
    """experiment.json, or a stand-in where it is missing or torn (a killed run), with the raw files."""
    data, problem = read_json(exp_dir / "experiment.json")
    problems = []
    if isinstance(data, dict) and "name" in data:
        record = ExperimentRecord.from_json(data)
    else:
        record = ExperimentRecord(
            re.sub(r"^\d+_", "", exp_dir.name), "(unknown: experiment.json could not be read)"
        )
        problems.append(f"{problem or 'experiment.json malformed'}: figures come from the raw files only")
    marks = record.marks  # memory is written from the idle window after load on, requests from burst 1
    memory = read_jsonl(exp_dir / "memory.jsonl", problems, expected=marks.idle_after_load is not None)
    requests = request_rows(
        read_jsonl(exp_dir / "requests.jsonl", problems, expected=bool(marks.bursts)), problems
    )
    loaded = LoadedExperiment(exp_dir, record, memory, requests, problems)
    # where a killed run left no workload mark, the workload spans its bursts, else from its first request
    # sent (a record saved before its first burst); no request and a record that reads: no workload ran
    times = [t for t, _ in loaded.device]
    sent = [r["t_send"] for r in requests if isinstance(r.get("t_send"), (int, float))]
    if marks.workload is None and marks.bursts:
        first = marks.bursts[0].start
        marks.workload = (first, marks.bursts[-1].end or max(times, default=first))
    elif marks.workload is None and times and not record.finished and (sent or problems):
        marks.workload = (min(sent or times), max(times))
    if marks.sampling_end is None and times:
        marks.sampling_end = max(times)
    return loaded


MAX_SAMPLE_GAP = 10  # sample intervals without a device sample before memory figures are void


def longest_gap(times: Iterable[float], span: Span) -> float:
    """The longest stretch of `span` without one of `times` in it (its ends count as edges)."""
    edges = [span[0], *(t for t in times if span[0] <= t <= span[1]), span[1]]
    return max(b - a for a, b in zip(edges, edges[1:]))


def memory_problems(record: ExperimentRecord, device: Samples, latency: LatencySummary) -> list[str]:
    """Why this experiment's memory figures must not be reported, if they must not."""
    problems = []
    if latency.requests and not latency.ok:
        problems.append(f"no request succeeded ({latency.failed} failed): memory under load was not measured")
    marks = record.marks
    start, end = (marks.idle_after_load or marks.workload or (None,))[0], marks.sampling_end
    if start is not None and end is not None and record.sample_interval_s:
        # the longest stretch without a sample: a stalled sampler leaves one, and a peak or a release time
        # read across it would be wrong
        gap = longest_gap((t for t, _ in device), (start, end))
        if gap > MAX_SAMPLE_GAP * record.sample_interval_s:
            problems.append(
                f"device memory was not sampled for {gap:.1f} s, past {MAX_SAMPLE_GAP} sample intervals "
                f"({MAX_SAMPLE_GAP * record.sample_interval_s:.1f} s; sampler stalled or failed: "
                f"{record.sampler_error_kinds or 'no errors recorded'}): with no errors, the machine was "
                "too busy to sample; rerun with fewer other jobs beside it, or a lower --sample-hz"
            )
    return problems


@dataclasses.dataclass
class KvcachedView:
    """kvcached's own accounting, from its shared-memory segment."""

    limit_mib: float
    peak_used_mib: Optional[float]  # None: no read while a burst's requests ran (sampled_peaks_checked)
    peak_prealloc_mib: Optional[float]

    @classmethod
    def of(cls, rows: list[dict]) -> Optional[KvcachedView]:
        if not rows:
            return None
        peak = {key: max(r[key] for r in rows) / MIB for key in ("used_bytes", "prealloc_bytes")}
        return cls(rows[-1]["total_bytes"] / MIB, peak["used_bytes"], peak["prealloc_bytes"])


@dataclasses.dataclass
class VllmView:
    """vLLM's /metrics; None where the gauge never appeared."""

    max_running: Optional[float]
    max_waiting: Optional[float]
    preemptions: Optional[float]
    prefix_hit_rate: Optional[float] = omitted_if_none()  # with --prefix-caching: cached share of prompts

    @classmethod
    def of(cls, rows: list[dict]) -> Optional[VllmView]:
        if not rows:
            return None

        def peak(key: str) -> Optional[float]:
            return max((r[key] for r in rows if key in r), default=None)  # absent gauge: n/a, not 0

        def growth(key: str, among: list[dict]) -> Optional[float]:  # one reading: a count, not its growth
            return among[-1][key] - among[0][key] if len(among) > 1 else None

        prefix = [r for r in rows if "prefix_queries" in r and "prefix_hits" in r]
        hit_rate = ratio(growth("prefix_hits", prefix), growth("prefix_queries", prefix))
        preemptions = growth("preemptions", [r for r in rows if "preemptions" in r])
        return cls(peak("running"), peak("waiting"), preemptions, hit_rate if len(prefix) > 1 else None)


@dataclasses.dataclass
class ServerSummary:
    label: str
    model: str
    startup_s: Optional[float]
    reused: bool
    memory: MemorySummary  # NVML, its process tree
    latency: LatencySummary
    kvcached: Optional[KvcachedView] = omitted_if_none()
    vllm: Optional[VllmView] = omitted_if_none()
    latency_repeats: Optional[list[LatencySummary]] = omitted_if_none()  # one per repeat (--repeats > 1)
    footprint: Optional["Footprint"] = omitted_if_none()  # idle memory: weights, KV, the rest
    sleeps: Optional["SleepSplit"] = omitted_if_none()  # sleep mode: what each sleep freed
    memory_cost: Optional[MemoryCost] = omitted_if_none()  # NVML, its process tree, over the workload


# %% Summaries, part 2: vLLM's own clock around each burst, and one experiment's summary
@dataclasses.dataclass
class BurstClock:
    """One burst: the client's mean latencies beside the server's (its histograms' deltas)."""

    phase: str
    repeat: int
    client_ok: int  # requests the client saw complete
    server_counted: int  # requests the server's TTFT histogram counted meanwhile
    client_ttft_mean_s: Optional[float]
    server_ttft_mean_s: Optional[float]
    client_e2e_mean_s: Optional[float]
    server_e2e_mean_s: Optional[float]
    server_queue_mean_s: Optional[float]
    server_prefill_mean_s: Optional[float]
    server_decode_mean_s: Optional[float]


@dataclasses.dataclass
class ServerClock:
    """Client vs server over an experiment's bursts (request-weighted means). The gap is the time a
    request spends before vLLM's engine clock starts (HTTP, chat template, tokenization) and after it
    stops, plus the client's own overhead."""

    client_ttft_mean_s: Optional[float]
    server_ttft_mean_s: Optional[float]
    ttft_gap_ms: Optional[float]
    client_e2e_mean_s: Optional[float]
    server_e2e_mean_s: Optional[float]
    e2e_gap_ms: Optional[float]
    server_queue_mean_s: Optional[float]
    server_prefill_mean_s: Optional[float]
    server_decode_mean_s: Optional[float]
    bursts: list[BurstClock]


def histogram_mean(before: dict, after: dict, name: str) -> tuple[Optional[float], int]:
    """(mean of the observations between two snapshots, how many), (None, 0) without any."""
    if f"{name}_count" not in after or f"{name}_count" not in before:
        return None, 0
    count = after[f"{name}_count"] - before[f"{name}_count"]
    total = after[f"{name}_sum"] - before[f"{name}_sum"]
    return (total / count if count > 0 else None), max(0, int(round(count)))


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    data = [v for v in values if v is not None]
    try:
        return math.fsum(data) / len(data) if data else None  # exact sum: the same figure on every Python
    except OverflowError:  # a damaged file's 1e308s
        return math.fsum(v / len(data) for v in data)


SERVER_HISTOGRAMS = ("ttft", "e2e", "queue", "prefill", "decode")  # vLLM's, as /metrics reads them
CLIENT_CLOCKS = ("ttft", "e2e")  # the client's own latencies of the same names


def clock_fields(**sides: dict[str, Optional[float]]) -> dict[str, Optional[float]]:
    """The <side>_<name>_mean_s fields of a BurstClock or a ServerClock, from each side's means by name."""
    return {f"{side}_{k}_mean_s": v for side, means in sides.items() for k, v in means.items()}


def server_clock(marks: Marks, records: Iterable[RequestRecord | dict]) -> Optional[ServerClock]:
    """Each burst's clocks, then all bursts': the client's pooled, the server's weighted by their counts."""
    by_burst = grouped((r for r in as_records(records) if r.ok), "phase", "repeat")
    bursts, client, server = [], {k: [] for k in CLIENT_CLOCKS}, {k: [] for k in SERVER_HISTOGRAMS}
    for mark in (m for m in marks.bursts if m.server_before and m.server_after):
        ok = by_burst.get((mark.phase, mark.repeat), [])
        # from the actual send: an open-loop request's clocks start at its planned arrival
        mine = {k: [diff(getattr(r, f"{k}_s"), r.send_delay_s or 0.0) for r in ok] for k in CLIENT_CLOCKS}
        theirs = {k: histogram_mean(mark.server_before, mark.server_after, k) for k in SERVER_HISTOGRAMS}
        for k in CLIENT_CLOCKS:
            client[k] += mine[k]
        for k in SERVER_HISTOGRAMS:
            server[k].append(theirs[k])
        fields = clock_fields(
            client={k: mean(v) for k, v in mine.items()}, server={k: m for k, (m, _) in theirs.items()}
        )
        bursts.append(BurstClock(mark.phase, mark.repeat, len(ok), theirs["ttft"][1], **fields))
    if not bursts:
        return None
    means = {k: mean(v) for k, v in client.items()}
    pooled = {
        k: ratio(sum(m * n for m, n in p if m is not None), sum(n for _, n in p)) for k, p in server.items()
    }
    gaps = {k: diff(means[k], pooled[k]) for k in CLIENT_CLOCKS}
    gaps = {f"{k}_gap_ms": None if gap is None else gap * 1000 for k, gap in gaps.items()}
    return ServerClock(**clock_fields(client=means, server=pooled), **gaps, bursts=bursts)


@dataclasses.dataclass
class ExperimentSummary:
    name: str
    question: str
    device: MemorySummary  # NVML, the whole card
    latency: LatencySummary
    servers: dict[str, ServerSummary]
    phases: dict[str, LatencySummary]
    repeats: dict[str, Spread]  # 'ttft_s_p50' ... -> spread over repeats
    sampler_errors: int
    sampler_error_kinds: dict[str, int]
    kv_limits_bytes: dict[str, int]
    memory_valid: bool
    problems: list[str]
    phase_repeats: Optional[dict[str, list[LatencySummary]]] = omitted_if_none()
    latency_repeats: Optional[list[LatencySummary]] = omitted_if_none()  # the whole experiment, per repeat
    server_clock: Optional[ServerClock] = omitted_if_none()
    gpu_index: Optional[int] = omitted_if_none()
    sleep: Optional["SleepSummary"] = omitted_if_none()
    rate_sweep: Optional[list["RatePoint"]] = omitted_if_none()
    capacity: Optional["Capacity"] = omitted_if_none()  # over the rate sweep, with SLOs
    # device memory left above the level after load once each burst is over (just before the next one,
    # or at the end): where pages freed by requests that ended at different times stay mapped
    residual_after_burst_mib: Optional[list[Optional[float]]] = omitted_if_none()
    memory_cost: Optional[MemoryCost] = omitted_if_none()  # NVML, the whole card, over the workload
    prompt_tokens: Optional["PromptCheck"] = omitted_if_none()  # trace: the lengths vLLM counted vs planned


@dataclasses.dataclass
class PromptCheck:
    """A trace's prompt lengths against what vLLM counted, over the completed requests that have both."""

    requests: int
    planned: int
    counted: int

    @classmethod
    def of(cls, records: list[RequestRecord]) -> Optional[PromptCheck]:
        mine = [r for r in records if r.ok and r.planned_prompt_tokens and r.prompt_tokens is not None]
        if not mine:
            return None
        return cls(len(mine), sum(r.planned_prompt_tokens for r in mine), sum(r.prompt_tokens for r in mine))


@dataclasses.dataclass
class SleepSummary:
    """The sleep arm: how deep it slept between bursts and what waking and sleeping cost."""

    level: int
    wake_s: Distribution  # per burst: the wake-up its first requests waited for
    sleep_s: Distribution  # per burst: putting it back to sleep
    router: Optional[dict[str, dict]] = omitted_if_none()  # every model's traffic at once: router_summary

    @classmethod
    def of(cls, record: ExperimentRecord) -> Optional[SleepSummary]:
        if record.sleep_level is None:
            return None
        bursts = record.marks.bursts
        return cls(
            record.sleep_level,
            Distribution.of(b.wake_s for b in bursts),
            Distribution.of(b.sleep_s for b in bursts),
            router_summary(record.router) if record.router else None,
        )


RESIDUAL_WINDOW_S = 0.5  # the quiet stretch before the next burst over which a residual is read


def select(rows: Iterable[dict], **equal: Any) -> list[dict]:
    """The rows whose fields equal every one given (a row without the field does not match)."""
    return [r for r in rows if all(k in r and r[k] == v for k, v in equal.items())]


def summarize_experiment(
    loaded: LoadedExperiment, tolerance: float, slo: tuple[float, float] = (0.0, 0.0), target: float = 0.99
) -> ExperimentSummary:
    record, records, marks = loaded.record, loaded.records, loaded.record.marks
    latency = latency_summary(records, slo)
    invalid = memory_problems(record, loaded.device, latency)

    def memory(samples: Samples) -> tuple[MemorySummary, Optional[MemoryCost]]:
        """The summary and cost of (t, MiB) samples: void if invalid, cut where an unfinished run stopped."""
        if invalid:
            return MemorySummary.void(), None
        summary = memory_summary(samples, marks, tolerance)
        if not record.finished:  # memory was still coming back (or not) when the run stopped
            cut = dict.fromkeys(("release_s", "residual_mib", "residual_vs_load_mib"))
            return dataclasses.replace(summary, **cut), None
        return summary, memory_cost(samples, serving_span(marks))

    device, device_cost = memory(loaded.device)
    sweep = rate_sweep(records, marks, slo, [] if invalid else loaded.device)
    repeats, by_phase = sorted({r.repeat for r in records}), grouped(records, "phase")
    per = per_repeat(records, repeats)
    per_phase = {phase: per_repeat(mine, repeats) for (phase,), mine in by_phase.items()}
    views = {s["spec"]["name"]: server_view(s, loaded, memory, slo) for s in record.servers}
    servers, per_model_problems = per_model_memory_checked(views, device, device_cost, loaded)
    servers, peak_problems = sampled_peaks_checked(servers, loaded)
    return ExperimentSummary(
        **fields_of(record, "name", "question", "sampler_errors", "sampler_error_kinds", "gpu_index"),
        device=device,
        latency=latency,
        servers=servers,
        phases={phase: latency_summary(mine, slo) for (phase,), mine in by_phase.items()},
        repeats={f"{m}_{q}": Spread.of(p.quantile(m, q) for p in per) for m, q in LATENCY_KEYS if per},
        kv_limits_bytes=record.kv_limits,
        memory_valid=not invalid,
        problems=invalid + experiment_problems(loaded, latency) + per_model_problems + peak_problems,
        server_clock=server_clock(marks, records),
        phase_repeats=per_phase if per else None,
        latency_repeats=per,
        sleep=SleepSummary.of(record),
        rate_sweep=sweep,
        capacity=capacity(sweep, target),
        residual_after_burst_mib=residuals_after_bursts(
            loaded.device, marks, device.idle_after_load_mib, routed=record.router is not None
        )
        if record.finished
        else None,
        memory_cost=device_cost,
        prompt_tokens=PromptCheck.of(records),
    )


def per_repeat(records: list[RequestRecord], repeats: list[int]) -> Optional[list[LatencySummary]]:
    """Latency in each of the whole run's `repeats` (one without requests too); None for fewer than two."""
    if len(repeats) < 2:
        return None
    by_repeat = grouped(records, "repeat")
    return [latency_summary(by_repeat.get((k,), [])) for k in repeats]


def experiment_problems(loaded: LoadedExperiment, latency: LatencySummary) -> list[str]:
    problems = list(loaded.problems) + unfaithful(latency)
    problems += sorted(
        {r["unattributed"] for r in select(loaded.memory, kind="process") if r.get("unattributed")}
    )
    if loaded.record.after_warmup == "timeout":
        problems.append(
            "memory had not settled --release-timeout-s after the warm-up: the idle level before the "
            "workload may be high and its flex low (raise --release-timeout-s)"
        )
    if not loaded.record.finished:
        problems.append(
            "incomplete: the experiment was interrupted or failed before its end; "
            "no release time or residual is reported"
        )
    return problems


def residuals_after_bursts(
    device: Samples, marks: Marks, idle_after_load_mib: Optional[float], routed: bool = False
) -> Optional[list[Optional[float]]]:
    """Device memory above the idle level once each burst is over (None without bursts or that level).
    Between bursts: n/a where the quiet stretch is shorter than the window (a short --gap-s); after the
    last one, sampling went on until memory was back or settled, however short that was. The sleep arm's
    stretch starts once the server is asleep again, not while it is falling asleep; under the sleep router
    (`routed`), once every model is (n/a after the last window of a run from before that was marked)."""
    if not marks.bursts or idle_after_load_mib is None:
        return None
    ends = [b.start for b in marks.bursts[1:]] + [marks.sampling_end or marks.bursts[-1].end]
    last = len(marks.bursts) - 1
    quiet = [None if b.end is None else b.end + (b.sleep_s or 0.0) for b in marks.bursts]
    if routed:
        quiet[last] = marks.asleep and quiet[last] and max(quiet[last], marks.asleep)
    return [
        diff(window_median(device, max(end - RESIDUAL_WINDOW_S, begin), end), idle_after_load_mib)
        if begin is not None and (end - begin >= RESIDUAL_WINDOW_S or (i == last and end > begin))
        else None
        for i, (begin, end) in enumerate(zip(quiet, ends))
    ]


def server_view(
    server: dict,
    loaded: LoadedExperiment,
    memory: Callable[[Samples], tuple[MemorySummary, Optional[MemoryCost]]],
    slo: tuple[float, float],
) -> ServerSummary:
    """One server's memory (NVML, its process tree, via `memory`), latency, kvcached's and vLLM's views."""
    slot, marks = server["spec"]["name"], loaded.record.marks
    mine = [r for r in loaded.records if r.server == slot]
    held, cost = memory(server_series(loaded, slot))
    kvcached_rows = select(loaded.memory, kind="kvcached", server=slot)
    text, span = saved_log(loaded.path, server).decode(errors="replace"), server.get("log_lines")
    figures = log_figures(text)  # the whole log: a reused server's start-up lines are before its span
    asleep = server["spec"].get("sleep_mode")  # idle means asleep: its weights and pool are not on the card
    # a sleep server's own stretch of its log, in lines as log_lines counts them; a killed run left the
    # stretch open (its start only): it runs to the log's end
    start, end = (*span, None)[:2] if span else (0, None)
    own = log_figures("\n".join(text.split("\n")[start:end])) if span and asleep else figures
    fresh = not start  # its stretch (or, without one, the whole log) begins with its start-up
    return ServerSummary(
        label=server["label"],
        model=server["spec"]["model"],
        startup_s=server["startup_s"],
        reused=server["label"] in loaded.record.reused,
        memory=held,
        latency=latency_summary(mine, slo),
        kvcached=KvcachedView.of(during(kvcached_rows, marks.workload)),
        vllm=VllmView.of(during(select(loaded.memory, kind="metrics", server=slot), marks.workload)),
        latency_repeats=per_repeat(mine, sorted({r.repeat for r in loaded.records})),
        footprint=None if asleep else footprint(server, held, figures, kvcached_rows, marks),
        sleeps=sleep_split(own, held.idle_before_workload_mib, True if span else None, fresh)
        if asleep
        else None,
        memory_cost=cost,
    )


def during(rows: list[dict], span: Optional[Span]) -> list[dict]:
    """The rows read over the workload, and the last one before it (the counters' start): not the
    discarded warm-up, which a reused server skips and a fresh one pays."""
    if span is None:
        return rows
    timed = [r for r in rows if "t" in r]
    return [r for r in timed if r["t"] < span[0]][-1:] + [r for r in timed if span[0] <= r["t"] <= span[1]]


def server_series(loaded: LoadedExperiment, slot: str) -> Samples:
    """A server's memory: NVML's for its process tree. A lone server's is the card's less what the card
    held beside it at idle, the same figure at the device series' rate: a sleep arm's bursts can fall
    between two per-process samples."""
    own = series(loaded.memory, "process", server=slot)
    idle_span = lone_server_idle_span(loaded)
    if idle_span is None:
        return own
    outside = diff(window_median(loaded.device, *idle_span), window_median(own, *idle_span))
    return own if outside is None else [(t, used - outside) for t, used in loaded.device]


def lone_server_idle_span(loaded: LoadedExperiment) -> Optional[Span]:
    """The idle window over which a lone server is read from the card; None: several servers, or no window."""
    marks = loaded.record.marks
    return (marks.idle_before or marks.idle_after_load) if len(loaded.record.servers) == 1 else None


# %% Summaries, part 3: per-model figures checked, against the card's and the bursts their reads missed
PER_MODEL_TOLERANCE = 0.05  # of the card's mean or peak: how far the per-model ones may miss adding up
# per-process samples in the shortest burst for per-model means within PER_MODEL_TOLERANCE: with a sleep
# server waking for two bursts of 0.4-2 s beside another, read from random phases, 4 samples a burst
# missed in 8-53% of 300 trials, 6 in up to 30%, 8 in none (benchmarks/per_model_sampling_bench.py)
SAMPLES_PER_BURST = 8


@dataclasses.dataclass(frozen=True)
class PeakSource:
    words: str  # as a problem names it
    part: str  # the ServerSummary field that holds its peaks
    peaks: tuple[str, ...]  # those peaks


PEAK_SOURCES = {  # memory.jsonl kind -> where its peaks live
    "process": PeakSource("its process tree (NVML)", "memory", ("peak_mib", "flex_mib")),
    "kvcached": PeakSource("kvcached's segment", "kvcached", ("peak_used_mib", "peak_prealloc_mib")),
    "metrics": PeakSource("vLLM's /metrics", "vllm", ("max_running", "max_waiting")),
}


def process_series_stalls(loaded: LoadedExperiment) -> list[str]:
    """Where several servers share the card, each one's process-tree series over the workload: a stretch
    of MAX_SAMPLE_GAP of its intervals without a read (the reads failed or stalled) voids the per-model means
    and peaks, which would be drawn straight across it."""
    span = serving_span(loaded.record.marks)
    if span is None or lone_server_idle_span(loaded) is not None:
        return []
    said = []
    for server in loaded.record.servers:
        slot = server["spec"]["name"]
        ticks = sorted(t for t, _ in series(loaded.memory, "process", server=slot))
        if len(ticks) < 2:
            continue
        every_s = float(np.median(np.diff(ticks)))
        gap = longest_gap(ticks, span)
        if gap > MAX_SAMPLE_GAP * every_s:
            said.append(
                f"per-model memory means and peaks n/a: {slot}'s process memory was not read for {gap:.1f} s "
                f"of the workload (reads every {every_s:.2f} s otherwise; sampler errors: "
                f"{loaded.record.sampler_error_kinds or 'none recorded'})"
            )
    return said


def sampling_advice(loaded: LoadedExperiment) -> str:
    """What makes per-model figures add up: SAMPLES_PER_BURST per-process samples in the shortest burst."""
    bursts = [b.end - b.start for b in loaded.record.marks.bursts if b.end is not None and b.end > b.start]
    ticks = sorted({row["t"] for row in select(loaded.memory, kind="process")})  # one per read of all
    if not bursts or len(ticks) < 2:
        return "raise --process-sample-hz"
    shortest, every_s = min(bursts), float(np.median(np.diff(ticks)))
    needed_hz = math.ceil(SAMPLES_PER_BURST / shortest)
    if needed_hz * every_s <= 1:  # already that fast: the bursts are not what it missed
        return "raise --process-sample-hz"
    return (
        f"its shortest burst lasted {shortest:.2f} s and each server was read every {every_s:.2f} s: "
        f"raise --process-sample-hz to {needed_hz} or more (about {SAMPLES_PER_BURST} samples a burst) or "
        "lengthen the bursts (--max-tokens)"
    )


def per_model_memory_checked(
    servers: dict[str, ServerSummary],
    device: MemorySummary,
    cost: Optional[MemoryCost],
    loaded: LoadedExperiment,
) -> tuple[dict[str, ServerSummary], list[str]]:
    """The servers, their workload means and peaks voided (with a problem saying why and which rate would
    do) where a per-process series slower than memory's changes (sleep servers sharing the card, waking for
    short bursts) missed them: less what the card held beside the servers at idle, the means must add up to
    the card's, the peaks to at least the card's. A lone server's are the card's: they always add up."""
    idles = [v.memory.idle_before_workload_mib for v in servers.values()]
    if not servers or device.idle_before_workload_mib is None or None in idles:
        return servers, []
    if stalled := process_series_stalls(loaded):  # what is averaged across a stall is a guess
        peaks = dict.fromkeys(PEAK_SOURCES["process"].peaks)
        return {
            k: dataclasses.replace(v, memory=dataclasses.replace(v.memory, **peaks), memory_cost=None)
            for k, v in servers.items()
        }, stalled
    outside = device.idle_before_workload_mib - sum(idles)
    means = [v.memory_cost and v.memory_cost.mean_mib for v in servers.values()]
    peaks = [v.memory.peak_mib for v in servers.values()]
    checks = []  # (what, the servers' sum, the card's less outside, the miss as a share of the card's)
    if cost is not None and cost.mean_mib > 0 and None not in means:
        card = cost.mean_mib - outside
        checks.append(("means", sum(means), card, abs(card - sum(means)) / cost.mean_mib))
    if device.peak_mib and None not in peaks:  # peaks at different times may add up to more, never less
        card = device.peak_mib - outside
        checks.append(("peaks", sum(peaks), card, (card - sum(peaks)) / device.peak_mib))
    missed = [check for check in checks if check[3] > PER_MODEL_TOLERANCE]
    advice = sampling_advice(loaded) if missed else ""
    problems = [
        f"per-model memory {what} n/a: they add up to {fmt(total)} MiB, but the card held {fmt(card)} MiB "
        f"for the servers (its {what[:-1]} less what it held beside them at idle), {fmt(100 * gap, 1)}% of "
        f"its {what[:-1]} apart: memory changed faster than the per-process series samples ({advice})"
        for what, total, card, gap in missed
    ]
    void = {what for what, *_ in missed}
    peaks = dict.fromkeys(PEAK_SOURCES["process"].peaks if "peaks" in void else ())
    means = {"memory_cost": None} if "means" in void else {}
    return {
        k: dataclasses.replace(v, memory=dataclasses.replace(v.memory, **peaks), **means)
        for k, v in servers.items()
    }, problems


def sampled_peaks_checked(
    servers: dict[str, ServerSummary], loaded: LoadedExperiment
) -> tuple[dict[str, ServerSummary], list[str]]:
    """The servers, their peaks (process tree memory, kvcached's use, vLLM's most running and waiting
    requests) voided, with a problem saying why, where no read of that series fell while a burst's requests
    ran (a short one, as --preset smoke's). A lone server's memory is the card's, read more often."""
    checked, problems = {}, []
    kinds = [kind for kind in PEAK_SOURCES if kind != "process" or lone_server_idle_span(loaded) is None]
    for slot, view in servers.items():
        bursts = [b for b in loaded.record.marks.bursts if b.server in (slot, ALL_SLOTS) and b.end]
        spans = busy_spans(loaded, slot, bursts)
        unread = dict.fromkeys(PEAK_SOURCES, 0) | {k: spans_unread(loaded, slot, k, spans) for k in kinds}
        for kind, source in PEAK_SOURCES.items():
            if unread[kind]:
                cut = dataclasses.replace(getattr(view, source.part), **dict.fromkeys(source.peaks))
                view = dataclasses.replace(view, **{source.part: cut})
        checked[slot] = view
        if any(unread.values()):
            sources = ", ".join(PEAK_SOURCES[kind].words for kind, count in unread.items() if count)
            which = (
                f"{max(unread.values())} of its {len(spans)} bursts" if len(spans) > 1 else "its one burst"
            )
            problems.append(
                f"{slot}'s peaks from {sources} n/a: no read fell while its requests ran in "
                f"{which} ({sampling_advice(loaded)})"
            )
    return checked, problems


def busy_spans(loaded: LoadedExperiment, slot: str, bursts: list[BurstMark]) -> list[Span]:
    """Each burst's first token to its last request's end, of `slot` (a sleeper's opens with a wake-up)."""
    ran = [r for r in loaded.records if r.ok and r.server == slot and r.ttft_s is not None]
    by_burst, spans = grouped(ran, "phase", "repeat"), []
    for burst in bursts:
        mine = by_burst.get((burst.phase, burst.repeat))
        if mine:
            # t_send is an open-loop request's planned arrival, and its clocks start there too
            spans.append((min(r.t_send + r.ttft_s for r in mine), max(r.t_send + r.e2e_s for r in mine)))
    return spans


def spans_unread(loaded: LoadedExperiment, slot: str, kind: str, spans: list[Span]) -> int:
    """How many of `spans` no `kind` row of `slot` was read within (none without such rows)."""
    times = sorted(row["t"] for row in select(loaded.memory, kind=kind, server=slot))
    if not times:  # no such series: no peak from it to void
        return 0
    return sum(bisect.bisect_left(times, start) == bisect.bisect_right(times, end) for start, end in spans)


# %% Summaries, part 4: open-loop windows, and each strategy's capacity within the SLOs
@dataclasses.dataclass
class RatePoint:
    """One open-loop window: latency at a planned arrival rate (timed from each planned arrival)."""

    phase: str
    repeat: int
    rate: float  # planned requests per second
    requests: int
    failed: int
    ttft_p50_s: Optional[float]
    ttft_p99_s: Optional[float]
    e2e_p50_s: Optional[float]
    e2e_p99_s: Optional[float]
    goodput: Optional[float] = omitted_if_none()
    max_send_delay_s: Optional[float] = omitted_if_none()  # the client's lateness: large, it fell behind
    mean_mib: Optional[float] = omitted_if_none()  # device memory held over the window (time-weighted)
    unit: Optional[str] = omitted_if_none()  # of `rate` when not requests/s: TRACE_SCALE or RAMP_PEAK


@dataclasses.dataclass
class Capacity:
    """The largest swept rate at which at least `target` of the requests met the SLOs, and at every lower
    rate (repeats pooled); below or above the sweep is said as such: it does not say how far beyond."""

    target: float  # share of requests, e.g. 0.99
    attainment: dict[str, Optional[float]]  # rate (requests/s) -> share of its requests within the SLOs
    verdict: str  # "within the sweep", "above the sweep" or "below the sweep"
    largest_held_rps: Optional[float] = None  # None below the sweep
    mean_mib: Optional[float] = None  # device memory held at that rate, mean over its windows
    unit: Optional[str] = omitted_if_none()  # of the rates when not requests/s: TRACE_SCALE or RAMP_PEAK


def rate_sweep(
    records: list[RequestRecord], marks: "Marks", slo: tuple[float, float], device: list = ()
) -> Optional[list[RatePoint]]:
    """One point per open-loop window (None for closed bursts), with the `device` memory held over it."""
    points, by_window = [], grouped(records, "phase", "repeat")
    for mark in (m for m in marks.bursts if m.rate is not None):
        lat = latency_summary(by_window.get((mark.phase, mark.repeat), []), slo)
        point = RatePoint(mark.phase, mark.repeat, mark.rate, lat.requests, lat.failed, *lat.quantiles())
        point.goodput = lat.goodput and lat.goodput.share
        point.max_send_delay_s = lat.send_delay_s and lat.send_delay_s.max
        cost = memory_cost(device, (mark.start, mark.end)) if mark.end is not None else None
        point.mean_mib, point.unit = cost and cost.mean_mib, mark.rate_unit
        points.append(point)
    return points or None


def capacity(points: Optional[list[RatePoint]], target: float) -> Optional[Capacity]:
    """Capacity over a rate sweep (None without one, or without SLOs)."""
    if not points or any(p.goodput is None and p.requests for p in points):
        return None
    shares = {  # a rate whose windows planned no arrival is n/a: neither held nor missed
        rate: ratio(sum(round((p.goodput or 0) * p.requests) for p in ps), sum(p.requests for p in ps))
        for (rate,), ps in grouped(sorted(points, key=lambda p: p.rate), "rate").items()
    }
    measured = [rate for rate, share in shares.items() if share is not None]
    if not measured:
        return None
    # 999 of 1,000 meets a 99.9% target, although 99.9 / 100 is a hair above 0.999 in floating point
    held = list(itertools.takewhile(lambda r: shares[r] >= target - 1e-9, measured))
    # above only where the highest rate swept was measured and held: one with no request tells nothing
    verdict = "below" if not held else "above" if held[-1] == max(shares) else "within"
    largest = held[-1] if held else None
    held_mib = [p.mean_mib for p in points if p.rate == largest and p.mean_mib is not None]
    attainment = {f"{r:g}": share for r, share in shares.items()}
    mean_mib = ratio(sum(held_mib), len(held_mib))
    return Capacity(target, attainment, f"{verdict} the sweep", largest, mean_mib, points[0].unit)


# %% Footprint: what an idle server's memory is made of (read from its log), and what sleep mode frees
# vLLM logs what it loaded and what it reserved; NVML gives the whole. Read from the logs the harness
# keeps anyway: nothing new touches the GPU. A line that is missing gives n/a, never 0.
VLLM_LOG_FIGURES = {
    "weights_gib": re.compile(r"Model loading took ([\d.]+) GiB"),
    "kv_pool_gib": re.compile(
        r"Available KV cache memory: ([\d.]+) GiB|reserved ([\d.]+) GiB memory for KV Cache"
    ),
    "sleep_pool_freed_gib": re.compile(r"CuMemAllocator: sleep freed ([\d.]+) GiB"),
    "sleep_freed_gib": re.compile(r"Sleep mode freed ([\d.]+) GiB"),
}


def log_figures(text: str) -> dict[str, list[float]]:
    """Every value of each figure vLLM logged, in order (a sleep-mode server logs one per sleep)."""
    return {
        name: [float(next(g for g in match.groups() if g)) for match in pattern.finditer(text)]
        for name, pattern in VLLM_LOG_FIGURES.items()
    }


def saved_log(exp_path: Path, server: dict) -> bytes:
    """A server's log in this run folder wherever made (a reused one's is its starter's); empty if gone."""
    logged = Path(server.get("log") or "")
    for path in (exp_path.parent / logged.parent.name / logged.name, exp_path / logged.name):
        with contextlib.suppress(OSError):
            return path.read_bytes()
        with contextlib.suppress(OSError):  # committed runs keep their logs gzipped
            return gzip.decompress(path.with_name(path.name + ".gz").read_bytes())
    return b""


@dataclasses.dataclass
class Footprint:
    """A server's memory before its workload (NVML, its process tree) and what it is made of."""

    total_mib: Optional[float]
    weights_mib: Optional[float]  # vLLM: "Model loading took X GiB"
    kv_mib: Optional[float]  # static: vLLM's pool; kvcached: its segment's used + prealloc pages
    rest_mib: Optional[float]  # CUDA context, activation workspace, allocator caches
    kv_source: str  # where kv_mib comes from


def footprint(
    server: dict, memory: MemorySummary, figures: dict[str, list[float]], segment: list[dict], marks: Marks
) -> Footprint:
    """A server's idle memory, split by vLLM's logged `figures` and, for kvcached, its `segment` rows."""
    total = memory.idle_before_workload_mib
    weights = figures["weights_gib"][-1] * 1024 if figures["weights_gib"] else None
    if server["spec"].get("kvcached"):
        held = [(r["t"], (r["used_bytes"] + r["prealloc_bytes"]) / MIB) for r in segment if "t" in r]
        kv = window_median(held, *(marks.idle_before or marks.idle_after_load or (math.inf, math.inf)))
        source = "kvcached's segment: used + prealloc"
    else:
        kv = figures["kv_pool_gib"][-1] * 1024 if figures["kv_pool_gib"] else None
        source = "vLLM's KV cache pool"
    return Footprint(total, weights, kv, diff(diff(total, weights), kv), source)


@dataclasses.dataclass
class SleepSplit:
    """What each sleep freed, by vLLM's own lines: its cumem pool (weights and KV), and the rest of the
    process (memory outside the pool, torch's caching allocator, regrown in every burst)."""

    sleeps: int
    pool_freed_mib: Optional[float]  # the last sleep's
    beyond_pool_mib: Distribution  # process freed - pool freed, per sleep after a burst
    asleep_mib: Optional[float]  # NVML, its process tree, asleep
    # True: the sleeps of this experiment only; None (runs older than the log spans): the whole log's
    this_experiment: Optional[bool] = omitted_if_none()
    # beyond the pool at the sleep right after load, before any request: what start-up left, not a burst
    after_load_mib: Optional[float] = omitted_if_none()


def sleep_split(
    figures: dict[str, list[float]], asleep_mib: Optional[float], this_experiment: Optional[bool], fresh: bool
) -> Optional[SleepSplit]:
    """`fresh`: the first sleep counted is the one right after the server's load."""
    pools, freed = figures["sleep_pool_freed_gib"], figures["sleep_freed_gib"]
    if not pools:
        return None
    beyond = [(f - p) * 1024 for p, f in zip(pools, freed)]
    after_load = beyond.pop(0) if fresh and beyond else None
    return SleepSplit(
        len(pools), pools[-1] * 1024, Distribution.of(beyond), asleep_mib, this_experiment, after_load
    )


# %% Comparisons: kvcached vs static (and sleep mode) within each group of the table
LATENCY_KEYS = [(metric, q) for metric in ("ttft_s", "e2e_s") for q in ("p50", "p99")]
STRATEGIES = ("static", "kvcached", "sleep")  # each compared with every one before it: kvcached/static, ...


@dataclasses.dataclass
class Figures:
    """One strategy's figures in a group of the table, one of its models or one of its phases."""

    ttft_s_p50: Optional[float]
    ttft_s_p99: Optional[float]
    e2e_s_p50: Optional[float]
    e2e_s_p99: Optional[float]
    failed: Optional[int] = omitted_if_none()
    peak_mib: Optional[float] = omitted_if_none()
    idle_after_load_mib: Optional[float] = omitted_if_none()
    idle_before_workload_mib: Optional[float] = omitted_if_none()
    max_waiting: Optional[float] = omitted_if_none()
    preemptions: Optional[float] = omitted_if_none()


@dataclasses.dataclass
class Comparison:
    """Each strategy's figures, and its latency ratios to every one before it in STRATEGIES ('sleep/static':
    mine / theirs, below 1 faster), per repeat too where both repeat; per model and phase for two models+."""

    figures: dict[str, Figures]
    ratios: dict[str, dict[str, Optional[float]]]
    over_repeats: Optional[dict[str, dict[str, Spread]]] = omitted_if_none()
    per_model: Optional[dict[str, "Comparison"]] = omitted_if_none()
    per_phase: Optional[dict[str, "Comparison"]] = omitted_if_none()

    def ratio(self, pair: str, key: str) -> tuple[Optional[float], Optional[Spread]]:
        """A ratio ('kvcached/static', 'ttft_s_p50') and its spread over repeats, where there is one."""
        return (self.ratios.get(pair) or {}).get(key), ((self.over_repeats or {}).get(pair) or {}).get(key)


def ratio_spreads(
    mine: Optional[list[LatencySummary]], theirs: Optional[list[LatencySummary]]
) -> Optional[dict[str, Spread]]:
    """The spread of each latency ratio over repeats (mine / theirs, k against k); None unless both repeat."""
    if not mine or not theirs or len(mine) < 2 or len(mine) != len(theirs):
        return None
    return {
        f"{m}_{q}": Spread.of(ratio(a.quantile(m, q), b.quantile(m, q)) for a, b in zip(mine, theirs))
        for m, q in LATENCY_KEYS
    }


def compared(figures: dict[str, Figures], repeats: dict[str, Optional[list[LatencySummary]]]) -> Comparison:
    """Figures per strategy (in STRATEGIES' order) with every pair's ratios."""
    pairs = [(x, y) for y, x in itertools.combinations([a for a in STRATEGIES if a in figures], 2)]
    keys = [f"{m}_{q}" for m, q in LATENCY_KEYS]
    ratios = {
        f"{x}/{y}": {k: ratio(getattr(figures[x], k), getattr(figures[y], k)) for k in keys} for x, y in pairs
    }
    spreads = {f"{x}/{y}": ratio_spreads(repeats.get(x), repeats.get(y)) for x, y in pairs}
    return Comparison(figures, ratios, {k: v for k, v in spreads.items() if v} or None)


def fields_of(record: Any, *names: str) -> dict[str, Any]:
    """The named fields of a record (None for each where there is no record), to pass on by name."""
    return {name: getattr(record, name) if record else None for name in names}


def group_figures(summary: ExperimentSummary) -> Figures:
    memory = fields_of(summary.device, "peak_mib", "idle_after_load_mib", "idle_before_workload_mib")
    return Figures(*summary.latency.quantiles(), failed=summary.latency.failed, **memory)


def model_figures(server: ServerSummary) -> Figures:
    figures = fields_of(server.memory, "peak_mib") | fields_of(server.vllm, "max_waiting", "preemptions")
    return Figures(*server.latency.quantiles(), failed=server.latency.failed, **figures)


def compare_group(arms: dict[str, ExperimentSummary], pair: bool) -> Comparison:
    """One group's strategies side by side; for two or more models, per model and per phase too."""
    block = compared(
        {arm: group_figures(s) for arm, s in arms.items()},
        {arm: s.latency_repeats for arm, s in arms.items()},
    )
    if not pair:
        return block
    kvcached_first = sorted(arms.values(), key=lambda s: s is not arms.get("kvcached"))
    slots_ = dict.fromkeys(slot for s in kvcached_first for slot in s.servers)
    block.per_model = {
        slot: compared(
            {arm: model_figures(s.servers[slot]) for arm, s in arms.items() if slot in s.servers},
            {arm: s.servers[slot].latency_repeats for arm, s in arms.items() if slot in s.servers},
        )
        for slot in slots_
    }
    phases = dict.fromkeys(phase for s in kvcached_first for phase in s.phases)
    block.per_phase = {
        phase: compared(
            {
                arm: Figures(*s.phases[phase].quantiles(), failed=s.phases[phase].failed)
                for arm, s in arms.items()
                if phase in s.phases
            },
            {arm: (s.phase_repeats or {}).get(phase) for arm, s in arms.items()},
        )
        for phase in phases
    }
    return block


def compare(summaries: dict[str, ExperimentSummary]) -> dict[str, Comparison]:
    """Per group: its strategies side by side where two or more ran, or sleep (its paragraph stands alone)."""
    out: dict[str, Comparison] = {}
    arms_of = group_arms(summaries)
    for name in GROUPS:
        present = {arm: summaries[arms_of[name][arm]] for arm in STRATEGIES if arm in arms_of.get(name, {})}
        if len(present) > 1 or "sleep" in present:
            out[name] = compare_group(present, GROUPS[name].pair)
    return out


# %% Plots (matplotlib's object API: no pyplot state, no backend switch inside a notebook)
COLORS = {"A": "#1f77b4", "B": "#d62728", "kvcached": "#1f77b4", "static": "#d62728", "sleep": "#2ca02c"}
MORE_COLORS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
FOOTPRINT_PARTS = (
    ("weights", "weights_mib", "#7f7f7f"),
    ("KV cache", "kv_mib", "#1f77b4"),
    ("the rest", "rest_mib", "#ff7f0e"),
)
SHADED = "shaded: {}; grey: the warm-up, discarded"  # what shade_bursts draws, for an axis label
WINDOW_COLOR = "#e6a100"  # every model's traffic at once (ALL_SLOTS): not the warm-up's grey


def color_of(name: str) -> str:
    """A model's or arm's colour: models after B take the next colours of matplotlib's cycle."""
    if name in COLORS:
        return COLORS[name]
    if len(name) == 1 and name.isupper():
        return MORE_COLORS[(ord(name) - ord("C")) % len(MORE_COLORS)]
    return "grey"


def new_figure(rows: int, cols: int = 1, size: tuple[float, float] = (11, 3.2)) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0], size[1] * rows), dpi=110)
    return fig, fig.subplots(rows, cols, squeeze=False, sharex="col")


def save_figure(fig: Any, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
    except OSError as exc:  # a file named plots, a folder in a plot's place, a full disk
        raise unwritten(path, exc, "move what is in its way aside") from None
    return path


def plot_series(ax: Any, points: list[tuple[float, float]], t0: float, **style: Any) -> None:
    """(time, value) points against the seconds since t0."""
    ax.plot([t - t0 for t, _ in points], [v for _, v in points], **style)


def shade_bursts(axes: Iterable[Any], marks: Marks, t0: float) -> None:
    """Each burst in its server's colour, and the warm-up in grey: else its peak reads as a stray burst."""
    for ax in axes:
        if marks.warmup:
            ax.axvspan(marks.warmup[0] - t0, marks.warmup[1] - t0, color="grey", alpha=0.12, lw=0)
        for burst in marks.bursts:
            if burst.end is not None:  # None: killed mid-burst
                color = WINDOW_COLOR if burst.server == ALL_SLOTS else color_of(burst.server)
                ax.axvspan(burst.start - t0, burst.end - t0, color=color, alpha=0.08, lw=0)


def finish_axes(axes: Iterable[Any], fontsize: int = 7, loc: Optional[str] = None) -> None:
    """A grid, whole MiB on the y axis (not an offset: "+2.029e4" above ticks of 0.5-5 reads as 5 MiB), and
    a see-through legend, which may sit on a peak."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=fontsize, loc=loc, framealpha=0.5)


def make_plots(
    run_dir: Path, loaded: dict[str, LoadedExperiment], summaries: dict[str, ExperimentSummary]
) -> list[str]:
    """One memory plot per group of the table present (arms in comparison order), the latency plot right
    after the single model's, then the plots of the whole run."""
    plots, arms_of, paths, order = run_dir / "plots", group_arms(loaded), [], COMPARED_ARMS + OTHER_ARMS
    for name, group in GROUPS.items():
        present = arms_of.get(name, {})
        ranked = sorted(present, key=lambda arm: order.index(arm) if arm in order else len(order))
        arms, plot = {arm: loaded[present[arm]] for arm in ranked}, plots / group.plot
        paths.append(plot_pair(plot, arms) if group.pair else plot_single(plot, arms, summaries))
    latency_at = list(GROUPS).index("single") + 1 if "single" in GROUPS else len(paths)
    paths.insert(latency_at, plot_latency(plots / "latency.png", loaded))
    paths += [
        plot_rate_sweep(plots / "rate_sweep.png", summaries),
        plot_attainment(plots / "attainment.png", summaries),
        plot_memory_per_model(plots / "memory_per_model.png", loaded),
        plot_footprint(plots / "footprint.png", summaries),
    ]
    return [p.name for p in paths if p is not None]


def plot_single(
    path: Path, arms: dict[str, LoadedExperiment], summaries: dict[str, ExperimentSummary]
) -> Optional[Path]:
    """One model's arms' device memory on one axis (kvcached zoomed below), the first arm's bursts shaded
    (the arms' bursts line up, their warm-ups need not: each arm is drawn from its idle level on)."""
    if not arms:
        return None
    zoom = "kvcached" in arms and len(arms) > 1  # a static pool's scale flattens the kvcached line
    fig, axes = new_figure(2 if zoom else 1, size=(11, 3.6))
    for i, (arm, loaded) in enumerate(arms.items()):
        marks, color = loaded.record.marks, color_of(arm)
        t0 = marks.workload[0] if marks.workload else loaded.t0
        idle = summaries[loaded.record.name].device.idle_before_workload_mib
        targets = axes[:, 0] if zoom and arm == "kvcached" else axes[:1, 0]
        since = (marks.idle_before or marks.workload or (loaded.t0,))[0]
        for ax in targets:
            drawn = [(t, v) for t, v in loaded.device if t >= since]
            plot_series(ax, drawn, t0, color=color, lw=1.6, label=f"{arm} (device used)")
            if idle is not None:
                ax.axhline(idle, color=color, ls=":", alpha=0.6, label=f"{arm} idle {idle:,.0f} MiB")
        if i == 0:  # its warm-up is not drawn
            shade_bursts(targets, dataclasses.replace(marks, warmup=None), t0)
    finish_axes(axes[:, 0], fontsize=8)
    titles = ("VRAM under a bursty workload: kvcached vs static pool, one model", "kvcached alone, zoomed")
    for (ax,), title in zip(axes, titles):
        ax.set(title=title, ylabel="GPU memory used (MiB)")
        ax.set_xlabel("seconds since the measured workload began (shaded: the first arm's bursts)")
    return save_figure(fig, path)


def plot_latency(path: Path, loaded: dict[str, LoadedExperiment]) -> Optional[Path]:
    """TTFT and end-to-end latency of the successful requests, a box per experiment and model."""
    boxes = {}
    for name, exp in loaded.items():
        ok = [r for r in exp.requests if r.get("ok")]
        for server in sorted({r["server"] for r in ok}):
            boxes[f"{name}\n{server}"] = [r for r in ok if r["server"] == server]
    if not boxes:
        return None
    fig, axes = new_figure(2, size=(max(8, 1.4 * len(boxes)), 3.4))
    for ax, key, what in zip(axes[:, 0], ("ttft_s", "e2e_s"), ("time to first token", "end-to-end latency")):
        values = [[r[key] for r in box if r.get(key) is not None] or [float("nan")] for box in boxes.values()]
        ax.boxplot(values, tick_labels=list(boxes), showfliers=True)
        ax.set_ylabel(f"{what} (s)")
    finish_axes(axes[:, 0])
    axes[0][0].set_title("Latency per experiment and model (successful requests)")
    return save_figure(fig, path)


def shaded_words(marks: Marks) -> str:
    """What shade_bursts shades, for an axis label: an open-loop experiment's rate windows, or its bursts."""
    return SHADED.format("windows" if any(b.rate is not None for b in marks.bursts) else "bursts")


def plot_pair(path: Path, arms: dict[str, LoadedExperiment]) -> Optional[Path]:
    """Per arm (columns): memory per model, kvcached's own view, vLLM's running/waiting requests."""
    if not arms:
        return None
    fig, axes = new_figure(3, len(arms), size=(6.5 * len(arms), 2.8))
    for (mem, kv, met), loaded in zip(axes.T, arms.values()):
        rows, t0 = loaded.memory, loaded.t0
        plot_series(mem, loaded.device, t0, color="black", lw=1.4, label="device total")
        for server in loaded.record.servers:
            slot, model = server["spec"]["name"], model_name(server["spec"]["model"])
            color = color_of(slot)
            proc = series(rows, "process", server=slot)
            plot_series(mem, proc, t0, color=color, lw=1.2, label=f"{slot}: {model}")
            used = series(rows, "kvcached", "used_bytes", server=slot, scale=1 / MIB)
            if used:
                plot_series(kv, used, t0, color=color, lw=1.2, label=f"{slot} kvcached used")
            for field, style in (("running", "-"), ("waiting", "--")):
                points = series(rows, "metrics", field, server=slot)
                plot_series(met, points, t0, color=color, ls=style, lw=1.1, label=f"{slot} {field}")
        if not any(r.get("kind") == "kvcached" for r in rows):
            kv.text(0.5, 0.5, "static pool: no kvcached segment", ha="center", transform=kv.transAxes)
        shade_bursts((mem, kv, met), loaded.record.marks, t0)
        finish_axes((mem, kv, met))
        mem.set(title=f"{loaded.record.name}: GPU memory (NVML: device and per server)", ylabel="MiB")
        kv.set(title="kvcached's own view: KV bytes in use (shared-memory segment)", ylabel="MiB")
        met.set_title("vLLM's /metrics: running (solid) and waiting (dashed) requests")
        met.set_xlabel(f"seconds since the experiment began ({shaded_words(loaded.record.marks)})")
    return save_figure(fig, path)


def model_name(model: str) -> str:
    """A model's last path part: 'Qwen2.5-0.5B-Instruct' of an id or a folder, '/m/a/' too."""
    return model.rstrip("/").split("/")[-1] or model


def plot_memory_per_model(path: Path, loaded: dict[str, LoadedExperiment]) -> Optional[Path]:
    """Every model's traffic at once (ramps, traces), per column: memory per model stacked, arrivals below."""
    shown = {n: e for n, e in loaded.items() if any(b.server == ALL_SLOTS for b in e.record.marks.bursts)}
    if not shown:
        return None
    fig, axes = new_figure(2, len(shown), size=(6.5 * len(shown), 2.8))
    for (held, arrivals), (name, exp) in zip(axes.T, shown.items()):
        t0, slots_ = exp.t0, [server["spec"]["name"] for server in exp.record.servers]
        grid = np.arange(0.0, max((t - t0 for t, _ in exp.device), default=0.0), 0.25)
        process_mib = {s: series(exp.memory, "process", server=s) for s in slots_}
        read = [s for s in slots_ if process_mib[s]]  # a model without reads is unknown, not 0
        stacked = [
            np.interp(grid, [t - t0 for t, _ in process_mib[s]], [v for _, v in process_mib[s]]) for s in read
        ]
        if read:
            held.stackplot(grid, stacked, labels=read, colors=[color_of(s) for s in read], alpha=0.8)
        sent, seconds = grouped(exp.records, "server"), range(int(grid[-1]) + 1 if len(grid) else 0)
        for slot in slots_:
            counts = collections.Counter(math.floor(r.t_send - t0) for r in sent.get((slot,), []))
            per_second = [counts.get(x, 0) for x in seconds]
            arrivals.step(list(seconds), per_second, where="post", color=color_of(slot), label=slot)
        shade_bursts((held, arrivals), exp.record.marks, t0)
        finish_axes((held, arrivals), loc="upper left")
        unread = ", ".join(s for s in slots_ if s not in read)
        unread = f"; no reads of {unread}" if unread else ""
        held.set(title=f"{name}: GPU memory per model, stacked (NVML by process tree{unread})", ylabel="MiB")
        arrivals.set_title("each model's requests per second (planned arrivals)")
        arrivals.set_xlabel(f"seconds since the experiment began ({SHADED.format('windows')})")
    return save_figure(fig, path)


def plot_footprint(path: Path, summaries: dict[str, ExperimentSummary]) -> Optional[Path]:
    """One stacked bar per server and experiment: weights, KV cache and the rest, before the workload."""
    bars, unread = footprint_bars(summaries)
    if not bars:
        return None
    fig, axes = new_figure(1, size=(max(7.5, 1.6 * len(bars)), 4.2))
    ax = axes[0][0]
    bottom = [0.0] * len(bars)
    for label, key, color in FOOTPRINT_PARTS:
        heights = [getattr(f, key) for f in bars.values()]
        ax.bar(list(bars), heights, bottom=bottom, color=color, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for x, total in enumerate(bottom):
        ax.annotate(f"{total:,.0f}", (x, total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB before the workload (NVML, process tree)")
    ax.set_title(
        "What each server holds before the workload:\n"
        "weights, KV cache and the rest (CUDA context, workspace, caches)"
    )
    ax.tick_params(axis="x", labelsize=7)
    if unread:
        ax.set_xlabel(f"not drawn, a part n/a (see summary.md): {', '.join(unread)}", fontsize=7)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def footprint_bars(summaries: dict[str, ExperimentSummary]) -> tuple[dict[str, Any], list[str]]:
    """The footprints to draw, by "experiment\nserver"; and the servers left out, a part of theirs n/a."""
    read = {
        f"{name}\n{v.label}": v.footprint
        for name, s in summaries.items()
        for v in s.servers.values()
        if v.footprint
    }
    whole = {
        k: f for k, f in read.items() if all(getattr(f, key) is not None for _, key, _ in FOOTPRINT_PARTS)
    }
    return whole, [k.replace("\n", " ") for k in read if k not in whole]


def arm_colors(names: list[str]) -> dict[str, str]:
    """Each experiment in its arm's colour, as in the other plots (static red, not orange), where no two
    share an arm; else matplotlib's cycle."""
    arms = [getattr(experiment(name), "arm", None) for name in names]
    if all(arm in COLORS for arm in arms) and len(set(arms)) == len(arms):
        return {name: COLORS[arm] for name, arm in zip(names, arms)}
    return {name: f"C{i}" for i, name in enumerate(names)}


def line_by_rate(ax: Any, pairs: list[tuple[float, Optional[float]]], style: str = "-", **kw: Any) -> None:
    """(rate, value) pairs in rate order, those without a value left out, as a line with markers; the
    repeats at one rate as their median (drawn each, the line would zigzag at every rate)."""
    at_rate: dict[float, list[float]] = collections.defaultdict(list)
    for x, y in pairs:
        if y is not None:
            at_rate[x].append(y)
    rates = sorted(at_rate)
    ax.plot(rates, [float(np.median(at_rate[x])) for x in rates], style, marker="o", lw=1.3, **kw)


def plot_rate_sweep(path: Path, summaries: dict[str, ExperimentSummary]) -> Optional[Path]:
    """Open loop: TTFT and E2E (p50 solid, p99 dashed) against the arrival rate, one line per experiment."""
    sweeps = {n: s.rate_sweep for n, s in summaries.items() if s.rate_sweep}
    if not sweeps:
        return None
    fig, axes = new_figure(1, 2, size=(11, 3.8))
    xlabel = rate_axis(p for points in sweeps.values() for p in points)
    for ax, metric, title in zip(axes[0], ("ttft", "e2e"), ("time to first token", "end-to-end latency")):
        colors = arm_colors(list(sweeps))
        for name, points in sweeps.items():
            for q, style in (("p50", "-"), ("p99", "--")):
                values = [(p.rate, getattr(p, f"{metric}_{q}_s")) for p in points]
                line_by_rate(ax, values, style, color=colors[name], label=f"{name} {q}")
        ax.set(title=f"{title} vs arrival rate", xlabel=xlabel, ylabel="seconds")
    finish_axes(axes[0])
    return save_figure(fig, path)


def plot_attainment(path: Path, summaries: dict[str, ExperimentSummary]) -> Optional[Path]:
    """SLO attainment and TTFT p99 against the arrival rate, one line per experiment, with their targets."""
    swept = {n: s for n, s in summaries.items() if s.capacity}
    if not swept:
        return None
    fig, axes = new_figure(1, 2, size=(11, 3.8))
    attained, late, colors = *axes[0], arm_colors(list(swept))
    for name, s in swept.items():
        shares = [(float(r), v) for r, v in s.capacity.attainment.items() if v is not None]
        p99 = [(p.rate, p.ttft_p99_s) for p in s.rate_sweep if p.ttft_p99_s is not None]
        if shares:
            line_by_rate(attained, shares, color=colors[name], label=name)
        if p99:
            line_by_rate(late, p99, color=colors[name], label=f"{name} p99")
    first = next(iter(swept.values()))
    target, slo_ttft = first.capacity.target, first.latency.goodput and first.latency.goodput.slo_ttft_ms
    attained.axhline(target, color="k", ls=":", lw=1, label=f"target {percent(target)}")
    if slo_ttft:
        late.axhline(slo_ttft / 1000, color="k", ls=":", lw=1, label=f"SLO {slo_ttft:g} ms")
    xlabel = rate_axis(p for s in swept.values() for p in s.rate_sweep)
    attained.set(title="SLO attainment vs arrival rate", xlabel=xlabel, ylim=(0, 1.02))
    attained.set_ylabel("share of requests within the SLOs")
    late.set(title="TTFT p99 vs arrival rate", xlabel=xlabel, ylabel="seconds")
    finish_axes(axes[0])
    return save_figure(fig, path)


# %% summary.md, part 1: formatting, the run's header and its tables (one function per section)
def fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value}{unit}"


def side_by_side(record: Any, *fields: str, digits: int = 0, scale: int = 1) -> str:
    """Fields of one record as "a / b" (n/a where the record is missing); scale=1000 shows seconds as ms."""
    values = (None if record is None else getattr(record, field) for field in fields)
    return " / ".join(fmt(v if v is None else v * scale, digits) for v in values)


def shown_versions(config: dict) -> str:
    """'vLLM 0.24.0, kvcached 0.1.6, torch 2.11.0', with n/a for a package the run did not find."""
    names = {"vllm": "vLLM", "kvcached": "kvcached", "torch": "torch"}
    return ", ".join(f"{shown} {dig(config, 'versions', name) or 'n/a'}" for name, shown in names.items())


def dig(d: Any, *path: str) -> Any:
    """A value deep inside config.json, which an old or torn run may lack (None then)."""
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def with_repeats(value: Optional[float], spread: Optional[Spread]) -> str:
    if spread is None:
        return fmt(value, 2)
    return f"{fmt(value, 2)} (repeats: {fmt(spread.median, 2)} [{fmt(spread.min, 2)}-{fmt(spread.max, 2)}])"


def model_runner_lines(config: dict) -> list[str]:
    """Which vLLM model runner the servers used (read from their logs), and a warning where they differ."""
    used = collections.defaultdict(list)
    for label, server in config.get("servers", {}).items():
        if server.get("model_runner"):
            used[server["model_runner"]].append(label)
    setting = (config.get("model_runner_env") or {}).get(RUNNER_VARIABLE)
    why = f" ({RUNNER_VARIABLE}={setting} in every server's environment)" if setting is not None else ""
    if len(used) > 1:
        listed = "; ".join(f"{runner} for {', '.join(labels)}" for runner, labels in sorted(used.items()))
        return paragraphs(
            f"**The servers ran on different vLLM model runners** ({listed}): the comparison measures two "
            f"model runners as well as two KV allocators. Set {RUNNER_VARIABLE}=0 in the shell to put every "
            f"server on V1."
        )
    return paragraphs(f"vLLM's model runner: {next(iter(used))} for every server{why}." if used else None)


Column = tuple[str, Callable[..., Any]]  # a heading, and what makes its cell from one row's values


def md_table(columns: list[Column], rows: Iterable[tuple]) -> list[str]:
    """A Markdown table, each cell made by its column's function from the row (an empty heading: `| |`)."""
    heading = "|" + "|".join(f" {title} " if title else " " for title, _ in columns) + "|"
    body = ("| " + " | ".join(str(cell(*row)) for _, cell in columns) + " |" for row in rows)
    return [heading, "|" + "---|" * len(columns), *body]


EXPERIMENT: Column = ("experiment", lambda name, *_: name)


def section(*lines: str) -> list[str]:
    return ["", *lines]


def titled(title: str, lines: list[str]) -> list[str]:
    return section(title, "", *lines) if lines else []


def table_section(title: str, columns: list[Column], rows: Iterable[tuple]) -> list[str]:
    rows = list(rows)
    return titled(title, md_table(columns, rows) if rows else [])


def paragraphs(*texts: Optional[str]) -> list[str]:
    """Paragraphs of one line each, a blank line before each; the empty ones (None, "") left out."""
    return [line for text in texts if text for line in section(text)]


def markdown_summary(
    config: dict,
    summaries: dict[str, ExperimentSummary],
    comparison: dict[str, Any],
    plots: Optional[list[str]],  # None: not drawn (--no-plots)
    timing: Optional[Timing] = None,
    failed: Optional[dict[str, str]] = None,  # experiment folder -> its error.json's error
    config_problem: Optional[str] = None,  # why config.json could not be read
) -> str:
    """summary.md: one function per section, in the order a reader wants them."""
    not_fresh = {  # experiments whose idle level after load includes a reused (not freshly loaded) server
        name
        for name, s in summaries.items()
        if s.device.idle_after_load_mib is not None and any(v.reused for v in s.servers.values())
    }
    lines = [
        *summary_header(config, summaries, config_problem),
        *main_table(summaries, not_fresh),
        *model_runner_lines(config),
        *per_token_table(summaries),
        *problems_list(summaries),
        *short_outputs_note(config, summaries),
        *per_model_table(summaries),
        *memory_cost_table(summaries),
        *footprint_table(summaries),
        *sleep_split_lines(summaries, comparison),
        *[
            line
            for name, block in comparison.items()
            for line in comparison_lines(name, block, summaries, config)
        ],
        *one_run_note(comparison),
        *cards_apart_lines(config, summaries),
        *residuals_line(summaries),
        *rate_sweep_table(summaries),
        *capacity_table(summaries),
        *router_lines(summaries),
        *server_clock_table(summaries),
        *startups_lines(config, summaries),
        *time_line(timing),
        *repeats_list(summaries),
        *(
            section("Plots:", "", *[f"![{p}](plots/{p})" for p in plots])
            if plots is not None
            else section("Plots: none drawn (--no-plots; `--report` without it draws them).")
        ),
        *definitions(config, not_fresh),
        *titled("Failed experiments:", [f"- {k}: {v}" for k, v in (failed or {}).items()]),
    ]
    return "\n".join(lines) + "\n"


def summary_header(
    config: dict, summaries: dict[str, ExperimentSummary], config_problem: Optional[str]
) -> list[str]:
    gpu = config.get("gpu", {})
    note = config_problem and f"> **Note:** {config_problem}; run details are missing from this summary."
    unfinished = (
        "> **This run was interrupted** before it finished: experiments after the one in flight "
        "did not run, and the one in flight is partial (marked incomplete below)."
        if config.get("interrupted")
        else "> **This run did not finish** (it was killed, or is still running): the summary shows "
        "what was recorded until then."
        if config and "finished_utc" not in config
        else None
    )
    top = paragraphs(
        note,
        f"# kvcached vs static KV cache: {config.get('run_name', '')}",
        unfinished,
        nothing_served_line(summaries),
        f"GPU: {gpu.get('name', '?')} ({fmt(gpu.get('total_mib'))} MiB, driver {gpu.get('driver', '?')}); "
        f"{shown_versions(config)}; {config.get('started_utc', '')}",
        f"Command: `{config.get('command', '')}`",
    )
    used_plans = {plan for name in summaries for plan in (experiment(name).plans if experiment(name) else ())}
    workloads = [
        f"Workload `{key}`: {plan.get('sizing')}"
        for key, plan in config.get("plans", {}).items()
        if key in used_plans or plan_family(key) in used_plans
    ]
    return [*top[1:], "", *workloads]  # the paragraphs less the blank line before the first


def nothing_served_line(summaries: dict[str, ExperimentSummary]) -> Optional[str]:
    """At the top: the experiments where every request failed, whose figures are void."""
    none = [
        f"{n} ({s.latency.failed} of {s.latency.requests} failed)"
        for n, s in summaries.items()
        if not s.latency.ok and s.latency.requests
    ]
    if not none:
        return None
    return (
        f"> **No request succeeded in** {', '.join(none)}: no memory or latency figure is reported for "
        f"{'them' if len(none) > 1 else 'it'} (see Problems below)."
    )


def main_table(summaries: dict[str, ExperimentSummary], not_fresh: set[str]) -> list[str]:
    def startups(name: str, s: ExperimentSummary) -> str:
        return ", ".join(
            f"{k} {fmt(v.startup_s, 0)}{' (reused)' if v.reused else ''}" for k, v in s.servers.items()
        )

    def idle(mib: Optional[float], s: ExperimentSummary) -> str:
        return fmt(mib) + (" asleep" if s.sleep and mib is not None else "")

    columns: list[Column] = [
        (
            "experiment",
            lambda name, s: name if s.memory_valid else f"{name} (memory figures void, see below)",
        ),
        (
            "idle after load (MiB)",
            lambda name, s: idle(s.device.idle_after_load_mib, s) + (" *" if name in not_fresh else ""),
        ),
        ("idle before workload (MiB)", lambda _, s: idle(s.device.idle_before_workload_mib, s)),
        ("peak (MiB)", lambda _, s: fmt(s.device.peak_mib)),
        ("flex (MiB)", lambda _, s: fmt(s.device.flex_mib)),
        ("release (s)", lambda _, s: "flat" if s.device.release_s == 0 else fmt(s.device.release_s, 2)),
        ("TTFT p50/p90/p99 (s)", lambda _, s: side_by_side(s.latency.ttft_s, "p50", "p90", "p99", digits=3)),
        ("TPOT p50 (ms)", lambda _, s: side_by_side(s.latency.tpot_s, "p50", digits=1, scale=1000)),
        ("E2E p50/p99 (s)", lambda _, s: side_by_side(s.latency.e2e_s, "p50", "p99", digits=2)),
        ("tok/s", lambda _, s: fmt(s.latency.output_tokens_per_s)),
        ("failed", lambda _, s: f"{s.latency.failed}/{s.latency.requests}"),
        ("start-up (s)", startups),
    ]
    return section(*md_table(columns, summaries.items()))


def per_token_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    per_token = {n: s.latency for n, s in summaries.items() if s.latency.itl_s or s.latency.goodput}
    slos = next((lat.goodput for lat in per_token.values() if lat.goodput), None)

    def ms3(dist: Optional[Distribution]) -> str:
        return side_by_side(dist, "p50", "p90", "p99", digits=1, scale=1000) if dist else "n/a"

    def goodput(name: str, lat: LatencySummary) -> str:
        good = lat.goodput
        return f"{share_to_tenths(good.share)} ({good.met}/{good.of})" if good else "n/a"

    columns: list[Column] = [
        EXPERIMENT,
        ("TPOT p50 / p90 / p99", lambda _, lat: ms3(lat.tpot_s)),
        ("ITL p50 / p90 / p99", lambda _, lat: ms3(lat.itl_s)),
        *([("goodput", goodput)] if slos else []),
    ]
    title = f"; goodput = requests completed with {slo_words(slos, ' and ', '<=')}" if slos else ""
    return table_section(f"Per output token (ms){title}:", columns, per_token.items())


def problems_list(summaries: dict[str, ExperimentSummary]) -> list[str]:
    notes = [f"- {name}: {problem}" for name, s in summaries.items() for problem in s.problems]
    notes += [f"- {name}: {s.latency.ttft_note}" for name, s in summaries.items() if s.latency.ttft_note]
    notes += [
        f"- {name}: {s.sampler_errors} sampling errors ({s.sampler_error_kinds or 'see memory.jsonl'})"
        for name, s in summaries.items()
        if s.sampler_errors
    ]
    return titled("**Problems** (figures affected are n/a or flagged):", notes)


SHORT_OUTPUTS = 0.9  # responses shorter than this share of --max-tokens on average: sized for more KV


def short_outputs_note(config: dict, summaries: dict[str, ExperimentSummary]) -> list[str]:
    """Where the model ended its responses early, the workload (sized for --max-tokens each) needed less KV
    than planned: said, with the flag that keeps them as long as planned. Overload bursts ask for more."""
    planned, ignored = dig(config, "config", "max_tokens"), dig(config, "config", "ignore_eos")
    if not isinstance(planned, int) or planned < 2 or ignored is not False:
        return []
    if dig(config, "config", "output_tokens_dist") not in ("fixed", None):
        return []
    served = [
        (s.latency.output_tokens, s.latency.ok) for n, s in summaries.items() if not n.startswith("overload")
    ]
    tokens, ok = map(sum, zip(*served)) if served else (0, 0)
    if not ok or tokens / ok >= SHORT_OUTPUTS * planned:
        return []
    return paragraphs(
        f"Responses averaged {tokens / ok:.0f} of the {planned} output tokens planned (--max-tokens): the "
        "model ended them early, so each request held less KV than the workload was sized for. "
        "--ignore-eos makes every response as long as planned."
    )


def per_model_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    columns: list[Column] = [
        EXPERIMENT,
        ("model", lambda _, key, v: f"{key}: {model_name(v.model)}"),
        ("idle (MiB)", lambda _, key, v: fmt(v.memory.idle_before_workload_mib)),
        ("peak (MiB)", lambda _, key, v: fmt(v.memory.peak_mib)),
        (
            "kvcached peak used / limit (MiB)",
            lambda _, key, v: side_by_side(v.kvcached, "peak_used_mib", "limit_mib"),
        ),
        ("max running / waiting", lambda _, key, v: side_by_side(v.vllm, "max_running", "max_waiting")),
        ("preemptions", lambda _, key, v: fmt(v.vllm and v.vllm.preemptions)),
        ("TTFT p50/p99 (s)", lambda _, key, v: side_by_side(v.latency.ttft_s, "p50", "p99", digits=3)),
        ("E2E p50 (s)", lambda _, key, v: fmt(v.latency.e2e_s.p50, 2)),
        ("failed", lambda _, key, v: f"{v.latency.failed}/{v.latency.requests}"),
    ]
    return table_section(
        "Per model (memory from NVML per process tree; kvcached and vLLM's own views):",
        columns,
        ((n, k, v) for n, s in summaries.items() for k, v in s.servers.items() if len(s.servers) > 1),
    )


def memory_cost_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    def per_model(name: str, c: MemoryCost, s: ExperimentSummary) -> str:
        means = {slot: v.memory_cost and v.memory_cost.mean_mib for slot, v in s.servers.items()}
        known = any(mean is not None for mean in means.values())
        return ", ".join(f"{slot} {fmt(mean)}" for slot, mean in means.items()) if known else "n/a"

    columns: list[Column] = [
        EXPERIMENT,
        ("workload (s)", lambda _, c, s: fmt(c.workload_s, 1)),
        ("mean (MiB)", lambda _, c, s: fmt(c.mean_mib)),
        ("p95 (MiB)", lambda _, c, s: fmt(c.p95_mib)),
        ("peak (MiB)", lambda _, c, s: fmt(c.peak_mib)),
        ("GiB·h", lambda _, c, s: fmt(c.gib_hours, 4)),
        ("mean per model (MiB)", per_model),
    ]
    return table_section(
        "Memory held while serving (NVML over the workload, from its first request to its last one's end, "
        "the sleep arm's to its last fall-asleep; mean weighted by time; GiB·h = mean × the workload's "
        "length):",
        columns,
        ((name, s.memory_cost, s) for name, s in summaries.items() if s.memory_cost),
    )


# %% summary.md, part 2: the strategies compared, and what memory did after the bursts
def footprint_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    columns: list[Column] = [
        EXPERIMENT,
        ("server", lambda _, v, f: v.label),
        ("total", lambda _, v, f: fmt(f.total_mib)),
        *((label, lambda _, v, f, key=key: fmt(getattr(f, key))) for label, key, _ in FOOTPRINT_PARTS),
    ]
    return table_section(
        "What each server holds before its workload (MiB; the total from NVML by process tree, weights and "
        "a static pool from vLLM's log, kvcached's KV pages from its segment; the rest is the CUDA context, "
        "activation workspace and allocator caches, and for kvcached the pages a burst left mapped that its "
        "segment no longer counts; n/a where a log line is missing):",
        columns,
        (
            (name, v, f)
            for name, s in summaries.items()
            for v in s.servers.values()
            if (f := v.footprint) and (f.weights_mib is not None or f.kv_mib is not None)
        ),
    )


def sleep_split_line(name: str, server: ServerSummary, split: SleepSplit, kept: bool) -> str:
    """What one sleep-mode server's sleeps freed, by vLLM's own lines; a clause whose figure is n/a is left
    out."""
    # whose sleeps: this experiment's, or (runs before the log marks) the whole log's, shared with others
    counted = f"over the {split.sleeps} sleeps in its log"
    if split.this_experiment:
        counted = f"over the {split.sleeps} sleeps of this experiment"
    elif server.reused:
        counted += " (started for an earlier experiment: these include that one's sleeps)"
    elif kept:
        counted += " (kept for a later experiment: these include its sleeps)"
    line = f"- {name}, {server.label}: {counted}, each freed vLLM's cumem pool (weights and KV, "
    line += f"{fmt(split.pool_freed_mib)} MiB)"
    beyond = split.beyond_pool_mib
    if beyond is not None and beyond.mean is not None:
        line += (
            f"; each after a burst also freed {fmt(beyond.mean)} MiB on average (at most {fmt(beyond.max)} "
            "MiB) outside the pool: torch's caching allocator, regrown in each burst"
        )
    if split.after_load_mib is not None:
        line += f" (the sleep right after load: {fmt(split.after_load_mib)} MiB outside the pool)"
    asleep = (
        f" Asleep its processes held {fmt(split.asleep_mib)} MiB." if split.asleep_mib is not None else ""
    )
    return f"{line}.{asleep}"


def sleep_split_lines(summaries: dict[str, ExperimentSummary], comparison: dict[str, Any]) -> list[str]:
    kept = {v.label for s in summaries.values() for v in s.servers.values() if v.reused}
    lines = [
        sleep_split_line(name, v, split, v.label in kept)
        for name, s in summaries.items()
        for v in s.servers.values()
        if (split := v.sleeps) is not None
    ]
    sleep_arm = {group: arms.get("sleep") for group, arms in group_arms(summaries).items()}
    for name, block in comparison.items():  # one model: the awake peak against the same pool without sleep
        sleep, static = block.figures.get("sleep"), block.figures.get("static")
        over = diff(sleep.peak_mib, static.peak_mib) if sleep and static and not GROUPS[name].pair else None
        if over is not None:
            lines.append(awake_peak_line(sleep_arm[name], over))
    return titled("What sleep mode frees (vLLM's own lines at each sleep):", lines)


def awake_peak_line(name: str, over: float) -> str:
    """The sleep arm's (experiment `name`) awake peak against the same static pool: above it by the memory
    outside vLLM's cumem pool that its bursts regrew; below it where they regrew less than start-up took."""
    if over >= 0:
        return (
            f"- {name}: the awake peak exceeds the same static pool without sleep mode by {fmt(over)} "
            "MiB: memory outside vLLM's cumem pool, freed at each sleep."
        )
    return (
        f"- {name}: the awake peak stayed {fmt(-over)} MiB below the same static pool without sleep "
        "mode: the memory outside vLLM's cumem pool, freed at each sleep, regrew less in its bursts than "
        "at start-up."
    )


def one_run_note(comparison: dict[str, Comparison]) -> list[str]:
    """Latency ratios from one run of each arm, said as such: they move 10-60% between runs."""
    ratios = [block for block in comparison.values() if block.ratios]
    if not ratios or any(block.over_repeats for block in ratios):
        return []
    return paragraphs(
        "These ratios come from one run of each arm: latency moves 10-60% between runs of the same "
        "experiments, memory by a few MiB. Give --repeats 3 (each ratio's spread is shown), or compare "
        "runs with benchmarks/compare_runs.py, before reading a latency ratio as a difference."
    )


def comparison_lines(
    name: str, block: Comparison, summaries: dict[str, ExperimentSummary], config: dict
) -> list[str]:
    lines = []
    if {"kvcached", "static"} <= set(block.figures):
        apart = cards_apart(config, summaries, name)  # --gpus: memory read on cards of different levels
        if GROUPS[name].pair:  # the card's memory, as the one-model sentence gives it
            memory = memory_words(block, "the static split", apart, fresh=False)
            lines += paragraphs(f"**{name}, the whole card:** {memory}.")
        lines += single_lines(block, apart) if not GROUPS[name].pair else pair_lines(name, block)
    if "sleep" in block.figures:
        lines += paragraphs(sleep_paragraph(name, block, summaries[group_arms(summaries)[name]["sleep"]]))
    arms = group_arms(summaries)[name].values()
    cut = [exp for exp in arms if any(p.startswith("incomplete:") for p in summaries[exp].problems)]
    if lines and cut:
        lines += paragraphs(
            f"These ratios include {' and '.join(cut)}, cut short before "
            f"{'their' if len(cut) > 1 else 'its'} end: only what was finished counts (see Problems)."
        )
    return lines


CARD_LEVELS_APART_MIB = 64  # cards whose memory in use before the run differs by more: not compared alike


def cards_apart(config: dict, summaries: dict[str, ExperimentSummary], group: str) -> Optional[str]:
    """--gpus: where a group's arms ran on cards that held different memory before the run (another job's,
    say), which each arm's device figures include; which arm ran where, else None."""
    held = {card.get("index"): card.get("used_mib_at_start") for card in config.get("gpus") or []}
    on = {name: summaries[name].gpu_index for name in group_arms(summaries).get(group, {}).values()}
    levels = [held.get(index) for index in set(on.values())]
    if len(levels) < 2 or None in levels or max(levels) - min(levels) <= CARD_LEVELS_APART_MIB:
        return None
    return ", ".join(
        f"{name} on GPU {index} ({fmt(held[index])} MiB in use before)" for name, index in on.items()
    )


def cards_apart_lines(config: dict, summaries: dict[str, ExperimentSummary]) -> list[str]:
    apart = {group: cards_apart(config, summaries, group) for group in group_arms(summaries)}
    return paragraphs(
        *(
            f"**Compared across cards ({group}):** {where}: their device figures differ by what each card "
            "held beside the run too, so the savings between them are not the strategies' alone (the single "
            "model's are n/a in summary.json); per-server figures are not affected."
            for group, where in apart.items()
            if where
        )
    )


def single_lines(block: Comparison, apart: Optional[str] = None) -> list[str]:
    memory = memory_words(block, "the static pool", apart)
    ttft, e2e = (with_repeats(*block.ratio("kvcached/static", k)) for k in ("ttft_s_p50", "e2e_s_p50"))
    said = f"**One model:** {memory}; TTFT p50 ratio kvcached/static {ttft}, E2E p50 ratio {e2e}."
    return paragraphs(" ".join(filter(None, (said, survivors_note([("", block)])))))


def memory_words(
    block: Comparison, static_words: str, apart: Optional[str] = None, fresh: bool = True
) -> str:
    """What kvcached keeps less (or more) than the static arm, fresh (not where a server may be reused: its
    level after load is where an earlier experiment left it), warmed up and at peak, in words."""
    kvcached, static = block.figures["kvcached"], block.figures["static"]
    after_load = diff(static.idle_after_load_mib, kvcached.idle_after_load_mib) if fresh else None
    savings = [
        saving_words(after_load, "when idle after loading"),
        saving_words(  # kvcached keeps some pages a burst mapped: warmed up, it holds more than fresh
            diff(static.idle_before_workload_mib, kvcached.idle_before_workload_mib),
            "idle before the workload",
        ),
        saving_words(diff(static.peak_mib, kvcached.peak_mib), "at peak"),
    ]
    said = [words for words in savings if words]
    held = ", ".join(said[:-1]) + (" and " if len(said) > 1 else "") + (said[-1] if said else "")
    if apart:
        return "memory not compared: the arms ran on cards that held different memory before"
    return f"kvcached keeps {held} than {static_words}" if held else "memory n/a for one of the arms"


def saving_words(saving: Optional[float], when: str) -> str:
    """'7,655 MiB less when idle', '845 MiB more at peak'; '' where a figure is n/a."""
    if saving is None:
        return ""
    return f"{fmt(abs(saving))} MiB {'less' if saving >= 0 else 'more'} {when}"


def pair_lines(name: str, block: Comparison) -> list[str]:
    by_phase = GROUPS[name].ratios_by == "phase"
    parts = block.per_phase if by_phase else {f"model {k}": c for k, c in (block.per_model or {}).items()}
    columns: list[Column] = [
        ("", lambda label, c: label),
        *(
            (
                f"{m.removesuffix('_s').upper()} {q}",
                lambda _, c, key=f"{m}_{q}": with_repeats(*c.ratio("kvcached/static", key)),
            )
            for m, q in LATENCY_KEYS
        ),
    ]
    rows = [(label, c) for label, c in (parts or {}).items() if "kvcached" in c.figures]
    return titled(
        f"**{name}: elastic/static latency ratios** (below 1: kvcached faster)", md_table(columns, rows)
    ) + paragraphs(survivors_note(rows))


def survivors_note(rows: list[tuple[str, Comparison]]) -> str:
    """Where requests failed, that the ratios are over the ones that completed (a failure has no latency)."""
    counts = {
        label: {
            arm: c.figures[arm].failed or 0 for arm in ("kvcached", "static", "sleep") if arm in c.figures
        }
        for label, c in rows
    }
    failed = {label: arms for label, arms in counts.items() if any(arms.values())}
    if not failed:
        return ""
    each = "; ".join(
        f"{f'{label}: ' if label else ''}{', '.join(f'{arm} {fmt(n)}' for arm, n in arms.items())}"
        for label, arms in failed.items()
    )
    return f"These ratios are over the requests that completed. Failed, with no latency: {each}."


def sleep_paragraph(name: str, block: Comparison, sleep: ExperimentSummary) -> str:
    idle = {arm: (f := block.figures.get(arm)) and f.idle_before_workload_mib for arm in STRATEGIES}
    count = len(sleep.servers) if GROUPS[name].pair else 1
    models = {1: "one model", 2: "two models"}.get(count, f"{count} models")
    wake = sleep.sleep.wake_s if sleep.sleep else None
    wakes = (
        f"every burst first waits for a wake-up of {fmt(wake.mean, 2)} s on average (at most "
        f"{fmt(wake.max, 2)} s), which someone (a router) must trigger"
        if wake is not None and wake.mean is not None
        else "the router below woke each model for its requests"
        if sleep.sleep and sleep.sleep.router
        else "its wake-ups were not recorded"
    )
    level = f" (level {sleep.sleep.level})" if sleep.sleep and sleep.sleep.level is not None else ""
    # under a router the models sleep after --sleep-after-idle-s, which a short gap never reaches
    when = "before the workload" if sleep.sleep and sleep.sleep.router else "between bursts"
    beside = {"kvcached": "kvcached idle before the workload", "static": "static pool"}
    ran = [arm for arm in beside if arm in block.figures]
    held = ", ".join(f"{beside[arm]} {fmt(idle[arm])} MiB" for arm in ran)
    ttft = ", ".join(f"sleep/{arm} {with_repeats(*block.ratio(f'sleep/{arm}', 'ttft_s_p50'))}" for arm in ran)
    e2e = " and ".join(with_repeats(*block.ratio(f"sleep/{arm}", "e2e_s_p50")) for arm in ran)
    failed = f" {note}" if (note := survivors_note([("", block)])) else ""
    return (
        f"**vLLM sleep mode, {models}{level}:** asleep {when} the card holds {fmt(idle['sleep'])} MiB"
        f"{f' ({held})' if ran else ''}; {wakes}; kvcached "
        "needs nobody. "
        + (
            f"TTFT p50 {ttft}; E2E p50 {e2e}.{each_models_sleep_ratios(block, ran)}{failed}"
            if ran
            else "No kvcached or static arm ran beside it to compare."
        )
    )


def each_models_sleep_ratios(block: Comparison, ran: list[str]) -> str:
    """Each model's own TTFT p50 ratios: pooled, a model that sent few requests hides in the others'."""
    models = block.per_model or {}
    if len(models) < 2:
        return ""
    each = "; ".join(
        f"sleep/{arm} "
        + ", ".join(
            f"{slot} {fmt(c.ratio(f'sleep/{arm}', 'ttft_s_p50')[0], 2)}" for slot, c in models.items()
        )
        for arm in ran
    )
    return f" Per model, TTFT p50 {each}."


def residuals_line(summaries: dict[str, ExperimentSummary]) -> list[str]:
    residuals = [  # * as in the first table: a reused server's level after load is the last one's leftover
        f"{name}{' *' if any(v.reused for v in s.servers.values()) else ''} "
        + ", ".join(fmt(v) for v in s.residual_after_burst_mib)
        for name, s in summaries.items()
        if s.residual_after_burst_mib
    ]
    return paragraphs(
        residuals
        and "Device memory above its level after load once each burst is over (MiB; kvcached's pages "
        "that stay mapped show here): "
        + "; ".join(residuals)
    )


# %% summary.md, part 3: sweeps, capacity, the router, vLLM's clock, time and the notes under them
def rate_sweep_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    points = [(name, p) for name, s in summaries.items() for p in s.rate_sweep or ()]
    if not points:
        return []
    columns: list[Column] = [
        EXPERIMENT,
        ("window", lambda _, p: f"{p.phase}{f' (repeat {p.repeat + 1})' if p.repeat else ''}"),
        ("rate", lambda _, p: rate_words(p.rate, p.unit)),  # req/s, a ramp's peak or a trace's scale
        ("requests", lambda _, p: p.requests),
        ("failed", lambda _, p: p.failed),
        ("TTFT p50 / p99 (s)", lambda _, p: side_by_side(p, "ttft_p50_s", "ttft_p99_s", digits=3)),
        ("E2E p50 / p99 (s)", lambda _, p: side_by_side(p, "e2e_p50_s", "e2e_p99_s", digits=2)),
        ("goodput", lambda _, p: percent(p.goodput)),  # as the capacity table shows it
    ]
    delays = "; ".join(
        f"{name} p99 {fmt(s.latency.send_delay_s.p99 * 1000, 1)} ms"
        for name, s in summaries.items()
        if s.latency.send_delay_s and s.latency.send_delay_s.p99 is not None
    )
    checks = "; ".join(
        f"{name} {c.counted:,} of {c.planned:,} planned "
        f"({signed_tenths(100 * (c.counted / c.planned - 1))}%, {c.requests} requests)"
        for name, s in summaries.items()
        if (c := s.prompt_tokens)
    )
    return titled(
        "Open-loop arrivals (latency timed from each planned arrival):",
        [
            *md_table(columns, points),
            *paragraphs(
                delays
                and f"Send delay, how late requests went out after their planned arrival: {delays} (above "
                f"{FAITHFUL_SEND_DELAY_S * 1000:.0f} ms a run is flagged as not faithful to its plan).",
                checks and f"Prompt tokens vLLM counted against the trace's: {checks}.",
            ),
        ],
    )


def capacity_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    swept = {n: s for n, s in summaries.items() if s.capacity}
    if not swept:
        return []
    first = next(iter(swept.values()))
    rates = dict.fromkeys(r for s in swept.values() for r in s.capacity.attainment)
    columns: list[Column] = [
        EXPERIMENT,
        *(
            (rate_words(r, first.capacity.unit), lambda _, s, r=r: percent(s.capacity.attainment.get(r)))
            for r in rates
        ),
        ("capacity", lambda _, s: capacity_words(s.capacity)),
        ("memory held there (mean MiB)", lambda _, s: fmt(s.capacity.mean_mib)),
        ("GiB·h, whole sweep", lambda _, s: fmt(s.memory_cost and s.memory_cost.gib_hours, 4)),
    ]
    per_model = [  # where models share the card: each one's share within the SLOs over all windows
        f"- {name}, per model over all windows: "
        + ", ".join(
            f"{k} {percent(v.latency.goodput and v.latency.goodput.share)}" for k, v in s.servers.items()
        )
        for name, s in swept.items()
        if len(s.servers) > 1
    ]
    return titled(
        f"What one card takes within the SLOs ({slo_words(first.latency.goodput)}): capacity is the "
        f"largest swept rate at which at least {percent(first.capacity.target)} of the requests met them, "
        "and every lower rate too (repeats pooled):",
        [
            *md_table(columns, swept.items()),
            *(section(*per_model) if per_model else []),
            "",
            f"At {percent(first.capacity.target)} attainment, "
            + "; ".join(capacity_sentence(name, s) for name, s in swept.items())
            + "."
            + sweep_apart_words({s.capacity.verdict for s in swept.values()}, len(swept)),
        ],
    )


def sweep_apart_words(verdicts: set[str], strategies: int) -> str:
    """Where every strategy held the whole sweep, or none held its lowest rate, the sweep tells them not
    apart: which way to move the rates."""
    if strategies < 2 or len(verdicts) != 1 or verdicts == {"within the sweep"}:
        return ""
    way = "raise" if verdicts == {"above the sweep"} else "lower"
    return (
        f" Every strategy was {verdicts.pop()}, so this sweep does not tell them apart: {way} the rates "
        "(--rates, --peak-rates or --trace-rate-scale)."
    )


def router_lines(summaries: dict[str, ExperimentSummary]) -> list[str]:
    lines = [
        f"- {name}, {slot}: woke {r['wakes']} times ({fmt(r['wake_s'].mean, 2)} s on average), slept "
        f"{r['sleeps']} times; its requests waited {fmt(r['wait_s'].mean, 3)} s on average for it "
        f"(p99 {fmt(r['wait_s'].p99, 3)} s, at most {fmt(r['wait_s'].max, 3)} s)"
        + (f"; {r['gave_up']} never had a turn awake and failed" if r.get("gave_up") else "")
        for name, s in summaries.items()
        if s.sleep and s.sleep.router
        for slot, r in s.sleep.router.items()
    ]
    return titled(
        "Sleep router (a request for a sleeping model wakes it; a model idle for --sleep-after-idle-s "
        "sleeps; no more awake than fit at the static share; waits count in each request's latency):",
        lines,
    )


def percent(share: Optional[float]) -> str:
    """Rounded down to 0.1%: 98.99% reads 98.9%, never as a 99% target met."""
    return share_to_tenths(share).replace(".0%", "%")


def signed_tenths(value: float) -> str:
    """To 0.1, never '-0.0'."""
    return fmt(round(value, 1) + 0.0, 1)


def share_to_tenths(share: Optional[float]) -> str:
    """A share as a percentage rounded down to 0.1% ('100.0%' only where every request counted)."""
    return "n/a" if share is None else f"{math.floor(1000 * share + 1e-9) / 10:.1f}%"


def slo_words(goodput: Optional[Goodput], joiner: str = ", ", at_most: str = "≤") -> str:
    """The objectives that applied, e.g. "TTFT ≤ 1000 ms, TPOT ≤ 100 ms"."""
    slos = (("TTFT", goodput and goodput.slo_ttft_ms), ("TPOT", goodput and goodput.slo_tpot_ms))
    return joiner.join(f"{name} {at_most} {value:g} ms" for name, value in slos if value) or "no SLOs"


def capacity_words(c: Capacity) -> str:
    if c.verdict == "below the sweep":
        return "below the sweep"
    if c.verdict == "above the sweep":
        return f"above the sweep (held every rate, up to {rate_words(c.largest_held_rps, c.unit)})"
    return rate_words(c.largest_held_rps, c.unit)


def rate_words(rate: float | str, unit: Optional[str], long: bool = False) -> str:
    """A swept rate in words: '16 req/s' ('16 requests/s' long), a ramp's peak, or '2x the trace'."""
    number = f"{rate:g}" if isinstance(rate, float) else str(rate)
    if unit == TRACE_SCALE:
        return f"{number}x the trace"
    if unit == RAMP_PEAK:
        return f"{number} requests/s per model at peak" if long else f"peak {number} req/s"
    return f"{number} {'requests/s' if long else 'req/s'}"


def rate_axis(points: Iterable[RatePoint]) -> str:
    units = {p.unit for p in points}
    if TRACE_SCALE in units:
        return "the trace's arrival rate, scaled (x trace)"
    if RAMP_PEAK in units:
        return "each model's peak arrival rate (requests/s)"
    return "planned arrival rate (requests/s)"


def capacity_sentence(name: str, s: ExperimentSummary) -> str:
    c = s.capacity
    if c.largest_held_rps is None:
        lowest = min((rate for rate, share in c.attainment.items() if share is not None), key=float)
        return f"{name} missed it already at the lowest swept rate, {rate_words(lowest, c.unit, long=True)}"
    above = " (above the sweep)" if c.verdict == "above the sweep" else ""
    memory = f", the card holding {fmt(c.mean_mib)} MiB on average" if c.mean_mib is not None else ""
    return f"{name} held {rate_words(c.largest_held_rps, c.unit, long=True)}{above}{memory}"


def capacity_headline(c: Capacity) -> dict:
    out = {"verdict": c.verdict, "largest_held_rps": c.largest_held_rps, "mean_mib": c.mean_mib}
    return {**out, "unit": c.unit} if c.unit else out


def server_clock_table(summaries: dict[str, ExperimentSummary]) -> list[str]:
    def means(*clocks: str, digits: int = 1, scale: int = 1000) -> Callable[..., str]:
        return lambda _, c: side_by_side(c, *(f"{k}_mean_s" for k in clocks), digits=digits, scale=scale)

    columns: list[Column] = [
        EXPERIMENT,
        ("TTFT client / server (ms)", means("client_ttft", "server_ttft")),
        ("gap (ms)", lambda _, c: fmt(c.ttft_gap_ms, 1)),
        ("E2E client / server (s)", means("client_e2e", "server_e2e", digits=3, scale=1)),
        ("gap (ms)", lambda _, c: fmt(c.e2e_gap_ms, 1)),
        ("server queue / prefill / decode (ms)", means("server_queue", "server_prefill", "server_decode")),
    ]
    return table_section(
        "Client vs server latency (means; server = vLLM's own histograms around each burst; the gap "
        "is vLLM's front end, HTTP and tokenization, plus the client, and for the sleep arm the wake-up):",
        columns,
        ((name, s.server_clock) for name, s in summaries.items() if s.server_clock),
    )


def startups_lines(config: dict, summaries: dict[str, ExperimentSummary]) -> list[str]:
    starts = server_starts(summaries)
    engine = config.get("engine_start")
    started_by = f" vLLM's engine process started by {engine} (--engine-start)." if engine else ""
    lanes = config.get("lanes") or []
    return paragraphs(
        f"vLLM start-ups: {starts['started']} paid ({fmt(starts['startup_s_total'])} s added up, servers "
        f"started together each counted), {starts['reused']} avoided by reusing a running server "
        f"(~{fmt(starts['startup_s_saved'])} s saved: the start-up each took the first time, a cold one for "
        "the run's first servers)."
        f"{started_by}",
        first_startups_line(config.get("servers") or {}),
        len(lanes) > 1
        and "Cards (--gpus, experiments in parallel): "
        + "; ".join(f"GPU {lane['gpu_index']} ran {', '.join(lane['experiments'])}" for lane in lanes)
        + ".",
    )


def first_startups_line(servers: dict[str, dict]) -> Optional[str]:
    """The run's first start-ups (the earliest and those begun before it was ready), which also pay for
    what a fresh host has not cached yet: they are no measure of their arm."""
    started = {name: s for name, s in servers.items() if s.get("started_at") and s.get("ready_at")}
    if len(started) < 2:
        return None
    first = min(started.values(), key=lambda s: s["started_at"])
    cold = {name: s for name, s in started.items() if s["started_at"] < first["ready_at"]}
    took = [s["ready_at"] - s["started_at"] for s in cold.values()]
    return (
        f"The run's first start-ups ({', '.join(cold)}: {fmt(min(took))}"
        f"{f'-{fmt(max(took))}' if round(max(took)) > round(min(took)) else ''} s) also pay, on a host "
        "where vLLM has not run yet, for what it had not cached (files read the first time, kernels built): "
        "on a fresh H100 one static server was ready after 48 s first and 26 s next, and kvcached's after "
        "27 s. Leave these out when comparing the arms' start-up times."
    )


def time_line(timing: Optional[Timing]) -> list[str]:
    cards = len(timing.lanes) if timing and timing.lanes else 1
    overlap = f" (on {cards} cards at once: a second counts in each part under way on any card)"
    return paragraphs(
        timing
        and f"Time: {fmt(timing.wall_s)} s in all: preflight {fmt(timing.preflight_s)} s, then "
        f"{fmt(timing.table_s)} s for the experiments, of which vLLM start-ups {fmt(timing.startups_s)} s, "
        f"the planned workload {fmt(timing.workload_s)} s and the harness's own time "
        f"{fmt(timing.harness_overhead_s)} s "
        f"({fmt(100 * timing.harness_overhead_share, 1)}% of the experiments' time)"
        f"{overlap if cards > 1 else ''}."
    )


def repeats_list(summaries: dict[str, ExperimentSummary]) -> list[str]:
    return titled(
        "Spread over repeats (median [min, max]):",
        [
            f"- {name}: "
            + "; ".join(
                f"{k} {fmt(v.median, 3)} [{fmt(v.min, 3)}, {fmt(v.max, 3)}]" for k, v in s.repeats.items()
            )
            for name, s in summaries.items()
            if s.repeats
        ],
    )


def definitions(config: dict, not_fresh: set[str]) -> list[str]:
    tolerance, window = dig(config, "config", "release_tolerance"), dig(config, "config", "idle_window_s")
    return paragraphs(
        f"Definitions: *idle* = median device memory over {window or Config.idle_window_s:g} s "
        "with no requests; *flex* = peak - idle before the workload; *tok/s* = output tokens over the time "
        "from the first request sent to the last response (gaps between bursts included); *release* = "
        "seconds after the last burst until a device sample is within "
        f"{100 * (tolerance or Config.release_tolerance):g}% "
        "of that idle level (so up to one sample interval late; flat: memory never rose above that; n/a: it "
        "stayed above, see residual in summary.json).",
        "\\* A server reused from an earlier experiment was not freshly loaded: its level is where "
        "that experiment left it (a kvcached server keeps the pages its bursts mapped), so this figure "
        "depends on what ran before. *Idle before workload* (after a warm-up where one ran; a server "
        "that was warm already skips it) compares across runs of the same experiments in the same order."
        if not_fresh
        else None,
    )


# %% Report: where the time went, the headline, and summary.json, summary.md and plots from a run folder
def covered_s(spans: Iterable[Span]) -> float:
    """Seconds covered by at least one of the spans."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@dataclasses.dataclass
class Timing:
    """Where a run's time went; the harness's own: idle windows, warm-ups, waits for memory, stops."""

    wall_s: float
    preflight_s: float
    table_s: float  # first experiment's start to every server stopped
    startups_s: float  # covered by at least one vLLM start-up
    workload_s: float  # covered by at least one experiment's workload
    harness_overhead_s: float  # table_s - covered by start-ups or workloads
    harness_overhead_share: float  # of table_s
    lanes: Optional[dict[str, dict]] = omitted_if_none()  # per card, with --gpus


def run_timing(config: dict, loaded: dict[str, "LoadedExperiment"]) -> Optional[Timing]:
    times = config.get("timing") or {}
    if not {"started", "table_start", "table_end"} <= set(times):
        return None
    start, end = times["table_start"], times["table_end"]
    startups: dict[str, list] = collections.defaultdict(list)  # per card: each server's (started, ready)
    workloads: dict[str, list] = collections.defaultdict(list)  # per card: each experiment's workload
    for exp in loaded.values():
        lane = str(exp.record.gpu_index)
        for server in exp.record.servers:
            if server.get("started_at") is not None and server.get("ready_at") is not None:
                startups[lane].append((server["started_at"], server["ready_at"]))
        if exp.record.marks.workload:
            workloads[lane].append(exp.record.marks.workload)
    every_startup = [span for spans in startups.values() for span in spans]
    every_workload = [span for spans in workloads.values() for span in spans]
    table_s = end - start
    overhead = table_s - covered_s(every_startup + every_workload)
    lanes = {
        f"GPU {lane}": {
            "startups_s": covered_s(startups[lane]),
            "workload_s": covered_s(workloads[lane]),
            "last_workload_end_s": max((e for _, e in workloads[lane]), default=start) - start,
        }
        for lane in sorted(set(startups) | set(workloads))
    }
    return Timing(
        end - times["started"],
        start - times["started"],
        table_s,
        covered_s(every_startup),
        covered_s(every_workload),
        overhead,
        overhead / table_s if table_s > 0 else 0.0,
        lanes if len(lanes) > 1 else None,
    )


def server_starts(summaries: dict[str, ExperimentSummary]) -> dict:
    """vLLM start-ups paid and avoided: a reused server saves the start-up it took the first time."""
    entries = [v for s in summaries.values() for v in s.servers.values()]
    paid = [v.startup_s for v in entries if not v.reused and v.startup_s is not None]
    saved = [v.startup_s for v in entries if v.reused and v.startup_s is not None]
    return {
        "started": len(paid),
        "reused": len(saved),
        "startup_s_total": math.fsum(paid),
        "startup_s_saved": math.fsum(saved),
    }


def headline(
    run_dir: Path,
    summaries: dict[str, ExperimentSummary],
    comparison: dict[str, Any],
    apart: Optional[str] = None,
) -> dict:
    figures = comparison["single"].figures if "single" in comparison else {}
    kvcached, static = figures.get("kvcached"), figures.get("static")
    single = kvcached and static and not apart  # across cards of different levels: no saving to tell
    return {
        "run_dir": str(run_dir),
        "experiments": {
            n: {
                "idle_mib": s.device.idle_after_load_mib,
                "peak_mib": s.device.peak_mib,
                "mean_mib_serving": s.memory_cost and s.memory_cost.mean_mib,
                "gib_hours": s.memory_cost and s.memory_cost.gib_hours,
                **({"capacity": capacity_headline(s.capacity)} if s.capacity else {}),
                "release_s": s.device.release_s,
                "ttft_p50_s": s.latency.ttft_s.p50,
                "ttft_p99_s": s.latency.ttft_s.p99,
                "e2e_p50_s": s.latency.e2e_s.p50,
                "failed": s.latency.failed,
                **({"send_delay_p99_s": s.latency.send_delay_s.p99} if s.latency.send_delay_s else {}),
            }
            for n, s in summaries.items()
        },
        "idle_saving_mib": diff(static.idle_after_load_mib, kvcached.idle_after_load_mib) if single else None,
        "peak_saving_mib": diff(static.peak_mib, kvcached.peak_mib) if single else None,
        "server_starts": server_starts(summaries),
    }


def readable(obj: Any) -> Any:
    """The headline as printed: floats to 6 significant digits (summary.json keeps every digit)."""
    if isinstance(obj, dict):
        return {key: readable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [readable(value) for value in obj]
    return float(f"{obj:.6g}") if isinstance(obj, float) else obj


EXPERIMENT_FILES = (
    "experiment.json error.json memory.jsonl memory.jsonl.gz requests.jsonl requests.jsonl.gz".split()
)


def experiment_dirs(run_dir: Path) -> list[Path]:
    return [
        d
        for d in sorted(run_dir.iterdir())
        if d.is_dir() and re.match(r"\d+_", d.name) and any((d / f).exists() for f in EXPERIMENT_FILES)
    ]


def not_a_run_folder(folder: Path) -> str:
    """Why --report refuses a folder (a model's has a config.json too, and its own summary.md), and the
    runs inside it, where it is a results folder."""
    runs = sorted(d.name for d in folder.iterdir() if (d / "config.json").is_file())[-3:]
    inside = f"; the newest runs in it: {', '.join(runs)}" if runs else ""
    return f"--report: {folder} is not a run folder (no experiment folders, no run's config.json){inside}"


# config.json's fields the report reads, and the kind each must be; and its settings that must be numbers
REPORTED_CONFIG = {
    **dict.fromkeys(("config", "gpu", "plans", "servers", "model_runner_env", "timing"), dict),
    **dict.fromkeys(("gpus", "lanes"), list),
}
REPORTED_SETTINGS = (
    "release_tolerance",
    "slo_attainment",
    "slo_ttft_ms",
    "slo_tpot_ms",
    "trace_speedup",
    "idle_window_s",
)
TIMING_MARKS = ("started", "table_start", "table_end")


def all_dicts(entries: "list | dict") -> bool:
    return all(
        isinstance(entry, dict) for entry in (entries.values() if isinstance(entries, dict) else entries)
    )


def kept_dicts(entries: "list | dict") -> "list | dict":
    if isinstance(entries, dict):
        return {key: entry for key, entry in entries.items() if isinstance(entry, dict)}
    return [entry for entry in entries if isinstance(entry, dict)]


def readable_config(config: dict) -> tuple[dict, Optional[str]]:
    """config.json less its fields of the wrong kind (a damaged or hand-edited file), and which they were."""
    wrong = [
        key for key, kind in REPORTED_CONFIG.items() if key in config and not isinstance(config[key], kind)
    ]
    timing = config.get("timing") if "timing" not in wrong else None
    if timing and any(type(timing.get(mark, 0.0)) not in (int, float) for mark in TIMING_MARKS):
        wrong.append("timing")
    config = {key: value for key, value in config.items() if key not in wrong}
    entries = [key for key in ("servers", "gpus") if key in config and not all_dicts(config[key])]
    config.update({key: kept_dicts(config[key]) for key in entries})
    settings = config.get("config") or {}
    numbers = [k for k in REPORTED_SETTINGS if k in settings and type(settings[k]) not in (int, float)]
    if numbers:
        config["config"] = {key: value for key, value in settings.items() if key not in numbers}
    left = [*wrong, *(f"entries of {key}" for key in entries), *(f"config.{key}" for key in numbers)]
    said = f"config.json: {', '.join(left)} of the wrong kind, left out (defaults used)" if left else None
    return config, said


def report_experiment(
    exp_dir: Path, config: dict, tolerance: float, slo: tuple[float, float], target: float
) -> tuple[LoadedExperiment, ExperimentSummary]:
    """One experiment folder's figures, written beside its raw files (summary.json, requests.csv)."""
    exp = load_experiment(exp_dir)
    arrivals, speedup = (dig(config, "config", key) for key in ("arrivals", "trace_speedup"))
    rates_as_reported(exp.record.marks, arrivals, speedup)
    summary = summarize_experiment(exp, tolerance, slo, target)
    if (exp_dir / "requests.jsonl").exists():  # compressed archives of committed runs get none
        write_requests_csv(exp_dir / "requests.csv", exp.requests)
    write_summary(exp_dir / "summary.json", json.dumps(to_json(summary), indent=2))
    return exp, summary


def write_summary(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as exc:  # a folder in its place, or a full disk
        raise unwritten(path, exc, "move it aside") from exc


def unwritten(path: Path, exc: OSError, aside: str) -> ReportError:
    """A report file that cannot be written, and what to do: free space, or move what is in its place."""
    fix = "free some space, then --report again" if exc.errno in UNWRITABLE else aside
    return ReportError(f"cannot write {path} ({exc.strerror or exc}); {fix}")


def build_report(run_dir: Path, draw_plots: bool = True) -> dict:
    """summary.json, summary.md and plots from a run folder's raw files; returns the headline."""
    if not run_dir.is_dir():
        raise ReportError(
            f"--report: {run_dir} is not a folder; give a run folder, e.g. results/<timestamp>_<tag>"
        )
    config, config_problem = read_json(run_dir / "config.json")
    dirs = experiment_dirs(run_dir)
    if not dirs and not (isinstance(config, dict) and isinstance(config.get("config"), dict)):
        raise ReportError(not_a_run_folder(run_dir))
    config, shape_problem = readable_config(config if isinstance(config, dict) else {})
    config_problem = config_problem or shape_problem
    tolerance = dig(config, "config", "release_tolerance") or Config.release_tolerance
    slo = (dig(config, "config", "slo_ttft_ms") or 0.0, dig(config, "config", "slo_tpot_ms") or 0.0)
    target = (dig(config, "config", "slo_attainment") or Config.slo_attainment) / 100
    loaded: dict[str, LoadedExperiment] = {}
    summaries: dict[str, ExperimentSummary] = {}
    failed: dict[str, str] = {}
    for exp_dir in dirs:
        error, _ = read_json(exp_dir / "error.json")
        if error is not None:
            failed[exp_dir.name] = error.get("error") if isinstance(error, dict) else str(error)
        if not any((exp_dir / f).exists() for f in EXPERIMENT_FILES if f != "error.json"):
            continue
        try:
            exp, summary = report_experiment(exp_dir, config, tolerance, slo, target)
            loaded[exp.record.name], summaries[exp.record.name] = exp, summary  # a list for a name raises
        except (TypeError, AttributeError, KeyError, ValueError, IndexError, OSError) as exc:
            failed.setdefault(
                exp_dir.name, f"its files could not be read into a summary ({type(exc).__name__}: {exc})"
            )
    comparison = compare(summaries)
    plots = make_plots(run_dir, loaded, summaries) if draw_plots else None
    timing = run_timing(config, loaded)
    top = {
        "run": run_dir.name,
        "experiments": summaries,
        "comparison": comparison,
        "failed": failed,
        "plots": plots or [],
        "server_starts": server_starts(summaries),
        **({"timing": timing, "harness_overhead_s": timing.harness_overhead_s} if timing else {}),
        **({"problems": [config_problem]} if config_problem else {}),
    }
    md = markdown_summary(config, summaries, comparison, plots, timing, failed, config_problem)
    write_summary(run_dir / "summary.json", json.dumps(to_json(top), indent=2))
    write_summary(run_dir / "summary.md", md)
    return to_json(
        {
            **headline(run_dir, summaries, comparison, cards_apart(config, summaries, "single")),
            "failed": sorted(failed),
            "invalid": sorted(n for n, s in summaries.items() if not s.memory_valid),
            "problems": {n: s.problems for n, s in summaries.items() if s.problems},
            "interrupted": bool(config.get("interrupted")),
        }
    )


def report_command(run_dir: Path, draw_plots: bool) -> int:
    """--report: the summaries and plots rebuilt, shown inline in a notebook as a run's are."""
    result = build_report(run_dir, draw_plots=draw_plots)
    say(f"summary: {run_dir / 'summary.md'}\n{json.dumps(readable(result))}")
    if running_in_notebook():
        show_in_notebook(run_dir)
    return 0


def show_in_notebook(run_dir: Path) -> None:
    """Inline summary and plots in Jupyter/Colab (the files are written either way)."""
    try:
        with contextlib.suppress(Exception):
            from IPython.display import Image, Markdown, display

            display(Markdown((run_dir / "summary.md").read_text().split("\nPlots:")[0]))
            for png in sorted((run_dir / "plots").glob("*.png")):
                display(Image(filename=str(png)))
    except KeyboardInterrupt:  # the servers are stopped and every file written: only the display stops
        say(f"display stopped; the summary and plots are in {run_dir}")


# %% Preflight: what must hold before a server starts (--check prints it and stops)
def check_command(cfg: Config, nvml_module: Any) -> int:
    """--check: the preflight's checklist, and what the run refuses after it; 2 where a check fails."""
    experiments = parse_experiments(cfg.experiments)
    checks, nvml = preflight(cfg, experiments, nvml_module)
    say(checklist(checks))
    if all(c.ok for c in checks):
        plan_run(cfg, experiments, nvml)
    return 0 if all(c.ok for c in checks) else 2  # as the run's own refusal: nothing launched


@dataclasses.dataclass
class Check:
    name: str
    ok: bool  # False stops the run before anything launches
    detail: str  # one line: what was found
    fix: str = ""  # what to do about it
    warning: bool = False  # fine to run, but worth knowing

    def line(self) -> str:
        mark = "✗" if not self.ok else ("!" if self.warning else "✓")
        return f"  {mark} {self.name}: {self.detail}" + (
            f"\n      fix: {self.fix}" if self.fix and (not self.ok or self.warning) else ""
        )


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def warn(name: str, detail: str, fix: str = "") -> Check:
    return Check(name, True, detail, fix, warning=True)


PYTHONS = ((3, 10), (3, 13))  # what vLLM 0.24 and kvcached 0.1.6 declare
IMPORT_TIMEOUT_S = 240.0  # importing vLLM takes 15-25 s on a warm machine
TORCH_CUDA_LINE = re.compile(r"^cuda\s*(?::\s*[^=]+)?=\s*['\"]([\d.]+)['\"]", re.M)  # in torch/version.py


def check_python(version: tuple[int, int] = sys.version_info[:2]) -> Check:
    shown = f"Python {shown_release(version)} ({sys.executable})"
    oldest, newest = (shown_release(known) for known in PYTHONS)
    if version < PYTHONS[0]:
        return fail("python", shown, f"use Python {oldest}-{newest}")
    if version > PYTHONS[1]:
        untested = f"{shown}: newer than vLLM 0.24/kvcached 0.1.6 were tested on"
        return warn("python", untested, f"if an install fails, use Python {newest}")
    return Check("python", True, shown)


def check_keeper() -> Check:
    """Each server's keeper runs this file's functions shipped as source (in a notebook, IPython's)."""
    try:
        keeper_source()
        program_source(next_tick, device_loop, device_sampler, call="")  # read now, as the file is
    except (OSError, TypeError) as exc:
        fix = "run the file as a script, or its cells in Jupyter/IPython, which keep each cell's source"
        return fail("keeper", f"its source cannot be read ({exc})", fix)
    return Check("keeper", True, "its source can be shipped to each server's keeper")


def torch_cuda_version() -> Optional[str]:
    """torch's CUDA from torch/version.py, not imported: a CUDA context here would skew the readings."""
    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        with contextlib.suppress(OSError):
            found = TORCH_CUDA_LINE.search((Path(folder) / "version.py").read_text())
            if found:
                return found.group(1)
    return None


def check_driver(nvml: Any, torch_cuda: Optional[str]) -> Check:
    """The driver's CUDA version must reach the one torch (and so vLLM) was built for."""
    try:
        raw = nvml.nvmlSystemGetCudaDriverVersion()
        driver = nvml_text(nvml.nvmlSystemGetDriverVersion())
    except Exception as exc:
        return fail("driver", f"cannot read the driver's CUDA version ({exc!r})", "update the NVIDIA driver")
    have = (raw // 1000, raw % 1000 // 10)
    shown = f"driver {driver} supports CUDA {shown_release(have)}"
    if torch_cuda is None:
        return warn(
            "driver",
            shown + "; torch is not installed in this Python, so its CUDA build is not compared",
            "where the servers run another Python (--server-cmd), run --check with that one",
        )
    built = tuple(int(x) for x in torch_cuda.split(".")[:2])
    if have[0] < built[0]:
        return fail(
            "driver",
            f"{shown}, but torch was built for CUDA {torch_cuda}",
            f"install a driver for CUDA {built[0]} (R{580 if built[0] >= 13 else 525}+), or a vLLM/torch "
            f"built for CUDA {have[0]}.x (see the README's compatibility table)",
        )
    if have < built:
        leaning = f"{shown}; torch built for CUDA {torch_cuda} relies on minor-version compatibility"
        return warn("driver", leaning, "update the driver if kernels fail to load")
    return Check("driver", True, f"{shown}; torch built for CUDA {torch_cuda}")


def import_check(
    name: str, code: str, env: dict[str, str], timeout_s: float, fix: str, python: str = sys.executable
) -> tuple[Check, str]:
    """Run `code` in a fresh Python (the servers' interpreter): (the check, its stdout)."""
    try:
        proc = subprocess.run(
            [python, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return fail(name, f"importing took over {timeout_s:.0f} s", "check the installation"), ""
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        if last and re.match(r"\w+(Error|Exception)\b", last[-1]):  # the exception line says it all
            last = last[-1:]
        if "libcudart.so" in proc.stderr or "undefined symbol" in proc.stderr:
            fix = (
                "torch and vLLM were built for different CUDA versions: reinstall the pair together "
                "(see the README's compatibility table)"
            )
        return fail(name, " | ".join(last)[:300] or f"exit code {proc.returncode}", fix), ""
    printed = proc.stdout.strip().splitlines()
    return Check(name, True, printed[-1] if printed else "importable"), proc.stdout


def die_with_parent(parent: int) -> None:
    """Helper program: killed when the thread that started it ends (Linux), as a --preimport import check,
    started from a thread that a stop never reaches, outlived the run; gone at once if that came first."""
    import os

    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # elsewhere it ends when its import does
        pass
    if os.getppid() != parent:
        os._exit(1)


def probe_vllm() -> None:
    """Helper program: import vLLM's compiled extensions (vllm/_C*.so: a CUDA mismatch breaks them, and
    importing vllm alone would not load them) and say whether kvcached's autopatch came along."""
    import importlib.metadata  # binds importlib too, for import_module
    import pathlib
    import sys

    import torch  # noqa: F401  (vLLM's extensions need it loaded first)
    import vllm

    compiled = sorted({p.name.split(".")[0] for p in pathlib.Path(vllm.__file__).parent.glob("_C*.so")})
    for name in compiled:
        importlib.import_module("vllm." + name)
    print("autopatch", "kvcached.integration.vllm.autopatch" in sys.modules)
    version = importlib.metadata.version("vllm")
    print(f"vllm {version} importable (compiled: {', '.join(compiled) or 'none found'})")


def probe_module(module: str) -> None:
    """Helper program: import a --server-cmd's module."""
    import importlib

    importlib.import_module(module)
    print(module, "importable")


def check_serving_imports(
    cfg: Config, kvcached_needed: bool, timeout_s: float = IMPORT_TIMEOUT_S
) -> list[Check]:
    """vLLM's compiled part and kvcached's autopatch import, in a subprocess: no CUDA context here."""
    env = dict(
        os.environ,
        ENABLE_KVCACHED="true" if kvcached_needed else "false",
        KVCACHED_AUTOPATCH="1" if kvcached_needed else "0",
        CUDA_VISIBLE_DEVICES="",
    )
    if cfg.server_cmd:  # another engine (or a fake): its module imports, if it is run as one
        prefix = server_prefix(cfg)
        launch = module_launch(prefix)
        if launch is None:
            return [warn("vllm", f"not checked: servers run with --server-cmd {prefix[0]}")]
        python, module, _ = launch
        probe = program_source(
            die_with_parent, probe_module, call=f"die_with_parent({os.getpid()})\nprobe_module({module!r})"
        )
        fix = f"check --server-cmd: `{shlex.join(python)} -m {module}` must import"
        return [import_check("server", probe, env, timeout_s, fix, python=prefix[0])[0]]
    probe = program_source(die_with_parent, probe_vllm, call=f"die_with_parent({os.getpid()})\nprobe_vllm()")
    say("  checking that vLLM imports in a fresh Python (20-60 s)...")
    vllm, out = import_check("vllm", probe, env, timeout_s, "pip install -r requirements.txt (vllm==0.24.0)")
    if not (kvcached_needed and vllm.ok):
        return [vllm]
    if "autopatch True" in out:
        return [vllm, Check("kvcached", True, "autopatch hooks into vLLM")]
    unpatched = "vLLM imported without kvcached's autopatch: the kvcached arm would run plain vLLM"
    fix = "pip install kvcached==0.1.6 --no-build-isolation (its .pth hook must land in site-packages)"
    return [vllm, fail("kvcached", unpatched, fix)]


def check_results(results_dir: str) -> Check:
    parent, fix, made = Path(results_dir), "choose a writable folder with --results-dir", []
    try:
        if parent.exists() and not parent.is_dir():
            return fail("results", f"--results-dir: {parent} is a file, not a folder", fix)
        made = [p for p in (parent, *parent.parents) if not p.exists()]  # gone again after the check
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        detail = f"--results-dir: cannot write in {parent} ({exc.strerror or exc}); choose a writable folder"
        return fail("results", detail, fix)
    finally:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
    return Check("results", True, f"{results_dir}/ writable")


def check_model(cfg: Config, slot: str) -> Check:
    name, model = f"model {slot}", model_of(cfg, slot)
    flag = "--models" if cfg.models else f"--model-{slot.lower()}"
    if (Path(model).expanduser() / "config.json").is_file():
        return (
            too_long_for(cfg, slot)
            or no_chat_template(cfg, slot)
            or Check(name, True, f"{model} (local folder)")
        )
    if Path(model).expanduser().is_dir():  # not a hub id: asking the hub would only confuse
        return fail(
            name, f"{model}: a folder without config.json", f"{flag}: the folder that holds the model's files"
        )
    if cfg.server_cmd:  # another engine (or a fake) may name models its own way
        return warn(
            name,
            f"{model}: not looked up (--server-cmd may name models its own way)",
            "give a local folder with its config.json to have its size and length checked",
        )
    path, why = hub_config(model)
    if path is not None:
        return (
            too_long_for(cfg, slot)
            or no_chat_template(cfg, slot)
            or Check(name, True, f"{model} (hub or its cache)")
        )
    return fail(
        name,
        f"{model}: {why}",
        f"{flag}: a local folder with config.json, or the "
        "hub: set HF_TOKEN for gated models, HF_ENDPOINT for a mirror, or HF_HUB_OFFLINE=1 with the model "
        "in the cache",
    )


def no_chat_template(cfg: Config, slot: str) -> Optional[Check]:
    """A model whose tokenizer has no chat template (a base model) would answer every request with 400."""
    tokenizer = cfg.tokenizer or model_of(cfg, slot)  # the servers' --tokenizer, where one is given
    if "--chat-template" in extra_server_flags(cfg) or has_chat_template(tokenizer) is not False:
        return None
    return fail(
        f"model {slot}",
        f"{tokenizer}: its tokenizer has no chat template (a base model?), and vLLM refuses the chat "
        "completions the harness sends without one",
        "an instruct or chat model (or its --tokenizer), or --extra-server-args '--chat-template FILE'",
    )


# RoPE types whose factor vLLM does not multiply max_position_embeddings by (Llama 3.x, Phi-3's longrope)
UNSTRETCHED = (None, "default", "su", "longrope", "llama3")


def too_long_for(cfg: Config, slot: str) -> Optional[Check]:
    """vLLM refuses a --max-model-len past the model's max_position_embeddings (unless told to allow it);
    left to vLLM where RoPE scaling stretches that limit."""
    text = text_config(load_model_config(model_of(cfg, slot))[0] or {})
    limit = text.get("max_position_embeddings")
    ropes = [text.get("rope_scaling"), text.get("rope_parameters")]  # newer configs name "default" there
    stretched = any(
        isinstance(r, dict) and r.get("rope_type", r.get("type")) not in UNSTRETCHED for r in ropes
    )
    if not isinstance(limit, int) or stretched or cfg.max_model_len <= limit:
        return None
    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1":
        return None
    return fail(
        f"model {slot}",
        f"{model_of(cfg, slot)} takes at most {limit:,} tokens (max_position_embeddings): vLLM refuses "
        f"--max-model-len {cfg.max_model_len:,}",
        f"--max-model-len {limit}",
    )


def check_ports(cfg: Config, slots: Iterable[str]) -> list[Check]:
    unusable = bind_error(cfg.host, 0)  # any port: else every port check would blame its port
    if unusable:
        shown = f"--host {cfg.host}: not an address of this machine ({unusable.strerror or unusable})"
        fix = "pass --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)"
        return [Check("host", False, shown, fix)]
    checks = []
    for slot in slots:
        port = port_of(cfg, slot)
        taken = port_taken(cfg.host, port)
        shown = f"{cfg.host}:{port} " + (f"is already {taken}" if taken else "free")
        fix = f"stop what holds it (`ss -ltnp | grep {port}`) or pick another with {port_flag(cfg, slot)}"
        checks.append(Check(f"port {slot}", not taken, shown, fix))
    return checks


def preflight(
    cfg: Config,
    experiments: list[Experiment],
    nvml_module: Any,
    imports_later: bool = False,
    versions: Optional[dict] = None,
) -> tuple[list[Check], Any]:
    """Every check, in the order a new user meets the problems; (checks, NVML if it loaded).
    `imports_later`: import_checks_beside() runs the 20 s import check. `versions`: server_versions()."""
    checks = [check_python(), check_keeper(), check_results(cfg.results_dir)]
    gpu_checks, nvml = card_checks(cfg, experiments, nvml_module)
    slots = served_slots(cfg, experiments)
    checks += gpu_checks
    kvcached_needed = needs_kvcached(experiments)
    if not imports_later:
        checks += check_serving_imports(cfg, kvcached_needed)
    versions = server_versions(cfg) if versions is None else versions
    checks += [check_versions(versions, kvcached_needed), check_model_runner(versions, kvcached_needed)]
    checks += [check_model(cfg, slot) for slot in slots] + check_load_format(cfg.load_format)
    for lane, index in enumerate(gpu_indices(cfg)):
        checks += check_ports(lane_config(cfg, lane, index), slots)
    return checks, nvml


VLLM_LOAD_FORMATS = (  # vLLM 0.24's model loaders (a plugin may register more); gguf from older releases
    "auto hf bitsandbytes dummy fastsafetensors instanttensor mistral modelexpress npcache pt runai_streamer "
    "runai_streamer_sharded safetensors sharded_state tensorizer gguf"
).split()


def check_load_format(load_format: str) -> list[Check]:
    """A misspelt --load-format fails every server only once its engine loads the model: say so now."""
    if not load_format or load_format.lower() in VLLM_LOAD_FORMATS:
        return []
    return [
        warn(
            "load format",
            f"--load-format {load_format!r} is none of vLLM's own ({', '.join(VLLM_LOAD_FORMATS)}): unless a "
            "plugin registers it, every server fails as it loads the model",
            "check the spelling of --load-format",
        )
    ]


def checklist(checks: list[Check], title: str = "preflight:") -> str:
    return title + "\n" + "\n".join(c.line() for c in checks)


def needs_kvcached(experiments: list[Experiment]) -> bool:
    return any(e.arm == "kvcached" for e in experiments)


def served_slots(cfg: Config, experiments: list[Experiment]) -> list[str]:
    """The models (slots) the chosen experiments serve: experiments 1 and 2 alone serve model A only."""
    return sorted({s.name for e in experiments for s in e.servers(cfg, 0)})


# %% Preflight, part 2: what vLLM holds beside a model's weights and KV, at the batch it profiles
# Flags after which vLLM's memory is no longer config.json's sizes at 16 bits: the room checks skip.
RESIZING_SERVER_ARGS = "--quantization -q --dtype --kv-cache-dtype --cpu-offload-gb".split()
SIXTEEN_BIT_DTYPES = ("auto", "half", "float16", "bfloat16")  # --dtype values served at 2 bytes, as sized


@dataclasses.dataclass(frozen=True)
class MemoryFit:
    """Bytes vLLM 0.24 (--enforce-eager) holds beyond a model's weights (as weight_bytes estimates them) and
    KV at memory profiling: base + the larger of the sampler's logits (per_vocab_row x its vocabulary x the
    rows it samples) and the forward pass's activations (per token of the batch: per_intermediate x the MLP's
    width + per_hidden x the model's), + weight_share x its weights. A fit (benchmarks/workspace_fit.py)
    over Qwen2.5-0.5B to 32B shapes, Llama-3.1-8B's and vocabularies of 152k to 262k tokens on an H100, at
    2,048 to 32,768 batched tokens; every measured point lies within `below` and `above` of it
    (results/REFERENCE.md, "vLLM's own memory for larger models and vocabularies" and "... larger batches").
    Another card's CUDA context may differ by some hundred MiB."""

    base: int
    per_vocab_row: float  # the sampler's logits and their sorted copies, per entry
    per_intermediate: float  # the MLP's activations per token: 6 B x its width is its bf16 buffers
    per_hidden: float
    weight_share: float
    below: int
    above: int

    def fitted(self, text: dict, batch: "VllmBatch", weights: int) -> int:
        sampler = self.per_vocab_row * text["vocab_size"] * batch.rows
        widths = (
            self.per_intermediate * (text.get("intermediate_size") or 0)
            + self.per_hidden * text["hidden_size"]
        )
        return int(self.base + max(sampler, batch.tokens * widths) + self.weight_share * weights)


# Within --gpu-memory-utilization: activations and the sampler at memory profiling, non-torch memory.
VLLM_WORKSPACE = MemoryFit(int(0.415 * GIB), 14.4, 6.0, 6.5, 0.0072, int(0.16 * GIB), int(0.16 * GIB))
# All a server holds beside weights and KV (its CUDA context too), the lesser of either arm's.
VLLM_SERVER_REST = MemoryFit(1002 * MIB, 14.8, 3.0, 7.5, 0.0026, 140 * MIB, 140 * MIB)


@dataclasses.dataclass(frozen=True)
class ModelRoom:
    """What a server of one model holds at the least: its weights, the KV of one --max-model-len request and
    vLLM's own memory beside them (VLLM_WORKSPACE within its share, VLLM_SERVER_REST in all)."""

    weights: int
    request_kv: int
    workspace_least: int
    workspace_most: int
    rest: int  # the least a server holds beside weights and KV, either arm

    @property
    def static_need(self) -> int:
        """The least share, in bytes, in which vLLM starts: weights, one request and its workspace."""
        return self.weights + self.request_kv + self.workspace_least

    @property
    def advised(self) -> int:
        """What a share the checks advise holds: weights, one request and the most workspace."""
        return self.weights + self.request_kv + self.workspace_most


def model_room(cfg: Config, slot: str, batch: "VllmBatch") -> tuple[Optional[ModelRoom], str]:
    """A model's room from its config.json at the batch vLLM profiles its memory with, or (None, why it
    cannot be told from there)."""
    model_config, _ = load_model_config(model_of(cfg, slot))
    weights = weight_bytes(model_config) if model_config else None
    if weights is None:
        return None, f"no sizes for model {slot}'s weights"
    text = text_config(model_config)
    if "quantization_config" in model_config or "quantization_config" in text:
        return None, f"model {slot} is quantized (quantization_config in its config.json)"
    encoders = [key for key in ("vision_config", "audio_config") if key in model_config]
    if encoders:  # vLLM profiles its encoder too, and weight_bytes counts the text model only
        return None, f"model {slot} has an encoder beside its text model ({encoders[0]} in its config.json)"
    if str(text.get("torch_dtype", "bfloat16")) not in ("float16", "bfloat16", "float32"):
        return None, f"model {slot}'s weights are {text['torch_dtype']}: not sized here"
    sixteen_bit = extra_server_value(cfg, "--dtype") in SIXTEEN_BIT_DTYPES  # a T4's --dtype half, say
    resizing = [
        f
        for f in extra_server_flags(cfg)
        if f in RESIZING_SERVER_ARGS and not (f == "--dtype" and sixteen_bit)
    ]
    if resizing:
        return None, f"--extra-server-args sets {resizing[0]}"
    workspace = VLLM_WORKSPACE.fitted(text, batch, weights)
    rest = VLLM_SERVER_REST.fitted(text, batch, weights) - VLLM_SERVER_REST.below
    kv_per_token = kv_bytes_per_token(model_config)
    if kv_per_token is None:
        return None, f"no sizes for model {slot}'s KV in its config.json"
    request_kv = kv_per_token * cfg.max_model_len
    workspace_range = (workspace - VLLM_WORKSPACE.below, workspace + VLLM_WORKSPACE.above)
    return ModelRoom(weights, request_kv, *workspace_range, rest), ""


MEASURED_BATCHED_TOKENS = 32768  # the most the fits saw


@dataclasses.dataclass(frozen=True)
class VllmBatch:
    """What vLLM's API server batches on a card: 8,192 tokens and 1,024 sequences on one of 70 GiB or more
    (an A100 excepted), 2,048 and 256 on a smaller one, unless --extra-server-args sets them."""

    tokens: int  # --max-num-batched-tokens
    seqs: int  # --max-num-seqs

    @property
    def rows(self) -> int:
        """The sequences its sampler runs at memory profiling: as many as a batch holds."""
        return min(self.tokens, self.seqs)


@dataclasses.dataclass(frozen=True)
class CardRoom:
    """The card the room checks size against (the one with the least free memory)."""

    index: int
    total: int
    free: int
    batch: VllmBatch
    kvcached_headroom: int  # what kvcached leaves unmapped: it maps KV pages only while more is free


def vllm_batch(cfg: Config, total: int, card_name: str) -> VllmBatch:
    large_card = total >= 70 * GIB and "a100" not in card_name.lower()
    given = [extra_server_value(cfg, f"--max-num-{what}") for what in ("batched-tokens", "seqs")]
    defaults = (8192, 1024) if large_card else (2048, 256)
    return VllmBatch(*(int(v) if v and v.isdigit() else d for v, d in zip(given, defaults)))


def extra_server_value(cfg: Config, flag: str) -> Optional[str]:
    """The value --extra-server-args gives `flag` last (`--flag V` or `--flag=V`); None where it is unset."""
    args, value = shlex.split(cfg.extra_server_args), None
    for arg, following in zip(args, [*args[1:], ""]):
        name, equals, inline = arg.partition("=")
        if name == flag:
            value = inline if equals else following
    return value


# %% Preflight, part 3: room on the card for the static pools and the models
def card_checks(cfg: Config, experiments: list[Experiment], nvml_module: Any) -> tuple[list[Check], Any]:
    """NVML, the driver, each card's room for the static shares and the models, the split; (checks, NVML)."""
    try:
        indices = gpu_indices(cfg)
        nvml = open_gpu(nvml_module, indices, "--gpus" if cfg.gpus else "--gpu-index")
    except NoSuchCard as exc:  # NVML works; the index names no card
        return [fail("nvml", str(exc), "name a card this machine has (nvidia-smi -L lists them)")], None
    except ConfigError as exc:
        fix = (
            "run on a machine with an NVIDIA GPU and driver (pip install nvidia-ml-py); "
            "--report RUN_DIR needs neither"
        )
        return [fail("nvml", str(exc).split(". ")[0], fix)], None
    names = [nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
    shown = "; ".join(f"GPU {i}: {nvml_text(n)}" for i, n in zip(indices, names))
    checks = [Check("nvml", True, shown), check_driver(nvml, torch_cuda_version())]
    budget = int(cfg.overload_budget_gib * GIB)
    held = [static_held_at_once(e.servers(cfg, budget), awake_at_most(cfg)) for e in experiments]
    static = max(held, default=(0, 0))
    checks += [check_card(nvml, i, static) for i in indices]
    return checks + room_checks(cfg, nvml, indices, experiments, budget), nvml


def least_share(need: int, total: int) -> float:
    """The smallest --gpu-memory-utilization, to 2 places, that gives `need` bytes of a `total`-byte card."""
    return math.ceil(100 * need / total) / 100


def room_checks(
    cfg: Config, nvml: Any, indices: list[int], experiments: list[Experiment], budget: int
) -> list[Check]:
    """Room for each model's weights, one request and vLLM's own memory: in its static share (models fit,
    static split) and beside the models a kvcached experiment loads with it (models fit), on the card with
    the least free memory."""
    card = least_free_card(cfg, nvml, indices)
    split_in_run = any(e.name == "shared_static" for e in experiments)
    sizes = {}
    for slot in sorted({s.name for e in experiments for s in e.servers(cfg, budget)}):
        sizes[slot], why = model_room(cfg, slot, card.batch)
        if sizes[slot] is None:
            return [warn("models fit", f"not checked: {why}")]
    advised = {slot: least_share(room.advised, card.total) for slot, room in sizes.items()}
    floor = max((advised[s.name] for _, s in lone_static_servers(cfg, experiments, budget)), default=0.0)
    minimal = [advised[slot] for slot in slots(cfg)] if split_in_run else []
    fix = share_flags(cfg, floor, minimal)
    lone_fix = fix  # where no split holds the models, a lone server may still get its share without it
    if fix is None and floor <= MAX_STATIC_TOTAL:
        without_split = ", with shared_static left out of --experiments (no split holds every model)"
        lone_fix = f"--gpu-memory-utilization {floor:g}{without_split if split_in_run else ''}"
    checks = [check_models_fit(cfg, sizes, card, experiments, budget, lone_fix or "")]
    if split_in_run:
        checks.append(check_static_split(cfg, sizes, card, fix or ""))
    if card.batch.tokens > MEASURED_BATCHED_TOKENS:
        past = (
            f"--max-num-batched-tokens {card.batch.tokens:,} is past the {MEASURED_BATCHED_TOKENS:,} measured"
        )
        detail = f"{past}: vLLM's activations may hold more than the room checks count"
        checks.append(warn("batch", detail, "leave room beyond the shares they advise"))
    return checks


def least_free_card(cfg: Config, nvml: Any, indices: list[int]) -> CardRoom:
    cards = {i: nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices}
    index, memory = min(cards.items(), key=lambda card: card[1].total - card[1].used)
    name = nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(index))
    batch = vllm_batch(cfg, memory.total, nvml_text(name))
    headroom = int(memory.total * (1 - kvcached_utilization(os.environ | parse_env_pairs(cfg.kvcached_env))))
    return CardRoom(index, memory.total, memory.total - memory.used, batch, headroom)


def lone_static_servers(
    cfg: Config, experiments: list[Experiment], budget: int
) -> list[tuple[Experiment, ServerSpec]]:
    """Static and sleep-mode servers at --gpu-memory-utilization outside shared_static's split (a pool of
    --kv-cache-memory-bytes is sized to fit)."""
    return [
        (e, s)
        for e in experiments
        if e.name != "shared_static"
        for s in e.servers(cfg, budget)
        if not s.kvcached and not s.kv_cache_memory_bytes
    ]


def share_flags(cfg: Config, floor: float, minimal: list[float]) -> Optional[str]:
    """Flags that give every static pool its model's room: --gpu-memory-utilization of at least `floor` (the
    least a lone static or sleep-mode server needs) and, where shared_static runs, shares of at least
    `minimal`; None where no share can (more than MAX_STATIC_TOTAL)."""
    gmu = max(cfg.gpu_memory_utilization, floor)
    if gmu > MAX_STATIC_TOTAL or shares_total(minimal) > MAX_STATIC_TOTAL:
        return None
    raised = [f"--gpu-memory-utilization {gmu:g}"] if gmu > cfg.gpu_memory_utilization else []
    pair = len(minimal) == 2 and not cfg.static_shares
    b_derived = pair and not cfg.pair_utilization_b
    shares = static_shares(dataclasses.replace(cfg, gpu_memory_utilization=gmu)) if minimal else []
    fits = all(share >= least for share, least in zip(shares, minimal))
    if fits and shares_total(shares) <= MAX_STATIC_TOTAL and not (b_derived and gmu >= A_BELOW_FOR_DERIVED_B):
        return " ".join(raised)
    if pair:
        a, b = max(gmu, minimal[0]), minimal[1]
        lowered = round(STATIC_SPLIT_TOTAL - b, 2)
        if b_derived and max(floor, minimal[0]) <= lowered < A_BELOW_FOR_DERIVED_B:
            return (
                f"--gpu-memory-utilization {lowered:g} (model B's share is {STATIC_SPLIT_TOTAL:g} minus it)"
            )
        if shares_total([a, b]) <= MAX_STATIC_TOTAL:
            return f"--gpu-memory-utilization {a:g} --pair-utilization-b {b:g}"
    return " ".join([*raised, f"--static-shares {','.join(f'{v:g}' for v in minimal)}"])


def check_models_fit(
    cfg: Config,
    sizes: dict[str, ModelRoom],
    card: CardRoom,
    experiments: list[Experiment],
    budget: int,
    fix: str,
) -> Check:
    """A static or sleep-mode server at --gpu-memory-utilization holds its model's weights, one
    --max-model-len request and vLLM's workspace, else vLLM fails minutes in. The card's free memory holds
    the models an experiment's kvcached servers or fixed KV pools (--kv-cache-memory-bytes) load together,
    each server's own rest, the pools and one request; under kvcached, less what it keeps unused, else a
    server's requests wait for KV memory that never comes. shared_static: check_static_split."""
    for e in experiments:
        held = [s for s in e.servers(cfg, budget) if s.kvcached or s.kv_cache_memory_bytes]
        if short := pool_short_of_a_request(e, held, sizes, card.free) or start_gate_shut(
            e, held, sizes, card
        ):
            return short
        rests = [sizes[s.name].rest for s in held]
        need = sum(sizes[s.name].weights + (s.kv_cache_memory_bytes or 0) for s in held) + sum(rests)
        # the most KV one kvcached server maps at once: a request, or the overload burst past its share
        request = max((sizes[s.name].request_kv for s in held if s.kvcached), default=0)
        burst = cfg.overload_demand * budget / len(held) if e.shares_budget else 0
        need += max(request, burst)
        headroom = card.kvcached_headroom if any(s.kvcached for s in held) else 0
        if need <= card.free - headroom:
            continue
        if burst > request:  # the budget is what does not fit: the largest that does, if any
            room = card.free - headroom - (need - burst)
            fits = math.floor(10 * room * len(held) / cfg.overload_demand / GIB) / 10
            smaller = smaller_fix(e.name)
            kv, fix = (
                " and the overload burst",
                f"--overload-budget-gib {fits:g}, or {smaller}" if fits > 0 else smaller,
            )
        elif headroom:
            kv, fix = " and one request", smaller_fix(e.name)
        else:
            kv, fix = " and their KV pools", pools_fix(e, budget - (need - card.free), held, sizes)
        return models_short(e, held, rests, need, card, headroom, kv, fix)
    for e, spec in lone_static_servers(cfg, experiments, budget):
        share, need = spec.gpu_memory_utilization or 0, sizes[spec.name].static_need
        if share * card.total < need:
            return fail(
                "models fit",
                f"{e.name}: model {spec.name} at --gpu-memory-utilization {share:g} "
                f"({share * card.total / MIB:,.0f} MiB) cannot hold its weights, one request of "
                f"--max-model-len and vLLM's workspace ({need / MIB:,.0f} MiB)",
                fix or smaller_fix(e.name),
            )
    workspace = ", ".join(f"{slot} {room.workspace_most / GIB:.2f}" for slot, room in sizes.items())
    batch = f"{card.batch.tokens:,} batched tokens and {card.batch.rows:,} sampled rows"
    counted = f"vLLM's workspace up to {workspace} GiB at {batch}"
    return Check("models fit", True, f"each server holds its model's weights, one request and {counted}")


def models_short(
    e: Experiment,
    held: list[ServerSpec],
    rests: list[int],
    need: float,
    card: CardRoom,
    headroom: int,
    kv: str,
    fix: str,
) -> Check:
    """The failed check: what the experiment's servers hold together, against the card's free memory."""
    kept = (
        f", of which kvcached keeps {headroom / MIB:,.0f} MiB unused (KVCACHED_GPU_UTILIZATION)"
        if headroom
        else ""
    )
    shown = [f"{r / MIB:,.0f}" for r in rests]
    beside = f"{shown[0]} MiB beside each" if len(set(shown)) == 1 else f"{', '.join(shown)} MiB beside them"
    return fail(
        "models fit",
        f"{e.name}: the weights of model {', '.join(s.name for s in held)}, {beside} "
        f"(vLLM's CUDA context and workspace){kv} take {need / MIB:,.0f} MiB; GPU "
        f"{card.index} has {card.free / MIB:,.0f} MiB free{kept}",
        fix,
    )


def smaller_fix(experiment: str) -> str:
    return f"a smaller model, a shorter --max-model-len, or leave {experiment} out of --experiments"


def pool_short_of_a_request(
    e: Experiment, held: list[ServerSpec], sizes: dict[str, ModelRoom], free: int
) -> Optional[Check]:
    """A fixed KV pool (--overload-budget-gib split evenly) must hold one --max-model-len request: vLLM
    refuses to start with less. The fix names the budget that holds one where the card has room for it."""
    pools = [s for s in held if s.kv_cache_memory_bytes]
    short = [s for s in pools if s.kv_cache_memory_bytes < sizes[s.name].request_kv]
    if not short:
        return None
    least = math.ceil(10 * len(pools) * max(sizes[s.name].request_kv for s in pools) / GIB) / 10
    beside = sum(sizes[s.name].weights + sizes[s.name].rest for s in held)
    budget = f"--overload-budget-gib {least:g}, or " if beside + least * GIB <= free else ""
    return fail(
        "models fit",
        f"{e.name}: model {short[0].name}'s KV pool of {short[0].kv_cache_memory_bytes / MIB:,.0f} MiB (the "
        f"--overload-budget-gib split {len(pools)} ways) cannot hold one --max-model-len request "
        f"({sizes[short[0].name].request_kv / MIB:,.0f} MiB): vLLM refuses to start",
        budget + smaller_fix(e.name),
    )


def start_gate_shut(
    e: Experiment, held: list[ServerSpec], sizes: dict[str, ModelRoom], card: CardRoom
) -> Optional[Check]:
    """vLLM starts a server with a fixed KV pool only where KV_BYTES_START_GATE of the card is free: the last
    one to start needs it beside what the others hold by then."""
    gated = [s for s in held if s.kv_cache_memory_bytes]
    before = sum(sizes[s.name].weights + sizes[s.name].rest + s.kv_cache_memory_bytes for s in gated[:-1])
    if not gated or before + KV_BYTES_START_GATE * card.total <= card.free:
        return None
    # the pools are the budget's shares: the largest budget whose earlier pools leave the gate open, and
    # whose pools all fit beside every model
    models = [sizes[s.name].weights + sizes[s.name].rest for s in gated]
    gate_room = (
        (card.free - KV_BYTES_START_GATE * card.total - sum(models[:-1]))
        * len(gated)
        / max(len(gated) - 1, 1)
    )
    return fail(
        "models fit",
        f"{e.name}: vLLM starts a server only where {KV_BYTES_START_GATE:g} of the card "
        f"({KV_BYTES_START_GATE * card.total / MIB:,.0f} MiB) is free; the {len(gated) - 1} started before "
        f"the last hold {before / MIB:,.0f} MiB of GPU {card.index}'s {card.free / MIB:,.0f} MiB free",
        pools_fix(e, min(gate_room, card.free - sum(models)), gated, sizes),
    )


def pools_fix(e: Experiment, fitting: int, held: list[ServerSpec], sizes: dict[str, ModelRoom]) -> str:
    """Fixed KV pools too large for the card: the --overload-budget-gib that fits, where its share still
    holds one request per model (vLLM refuses a pool that cannot)."""
    budget = math.floor(10 * fitting / GIB) / 10
    if budget * GIB / len(held) < max(sizes[s.name].request_kv for s in held):
        return smaller_fix(e.name)
    return f"--overload-budget-gib {budget:g}, or {smaller_fix(e.name)}"


def check_static_split(cfg: Config, sizes: dict[str, ModelRoom], card: CardRoom, fix: str) -> Check:
    """Each share holds its weights, a --max-model-len request and vLLM's workspace; all fit (else vLLM
    refuses minutes in)."""
    needs = {slot: sizes[slot].static_need for slot in slots(cfg)}
    shown = ", ".join(f"{slot} {need / MIB:,.0f}" for slot, need in needs.items())
    room = MAX_STATIC_TOTAL * card.total
    if sum(needs.values()) > room:
        return fail(
            "static split",
            f"{len(needs)} models need {sum(needs.values()) / MIB:,.0f} MiB for their weights, one request "
            f"and vLLM's workspace each ({shown} MiB); {MAX_STATIC_TOTAL:g} of GPU {card.index} is "
            f"{room / MIB:,.0f} MiB",
            "name fewer or smaller --models, a shorter --max-model-len, or leave shared_static out of "
            "--experiments",
        )
    for (slot, need), share in zip(needs.items(), static_shares(cfg)):
        if share * card.total < need:
            return fail(
                "static split",
                f"model {slot}'s share {share:g} ({share * card.total / MIB:,.0f} MiB) cannot hold its "
                f"weights, one request of --max-model-len and vLLM's workspace ({need / MIB:,.0f} MiB)",
                fix or "name fewer or smaller --models, or a shorter --max-model-len",
            )
    return Check(
        "static split", True, f"each share holds its model, one request and vLLM's own ({shown} MiB)"
    )


def static_held_at_once(servers: Iterable[ServerSpec], sleepers_awake: int = 1) -> tuple[float, int]:
    """The card's fraction an experiment's static pools hold at once, and how many servers hold memory
    beside them: shared_static's pools add up; of shared_sleep's, the router keeps `sleepers_awake` awake,
    and the others asleep still hold their CUDA context."""
    pools = [s for s in servers if not s.kvcached and not s.kv_cache_memory_bytes]  # fixed pools: start gate
    awake = [s.gpu_memory_utilization or 0 for s in pools if not s.sleep_mode]
    sleepers = sorted((s.gpu_memory_utilization or 0 for s in pools if s.sleep_mode), reverse=True)
    return sum(awake) + sum(sleepers[:sleepers_awake]), len(awake) + len(sleepers)


# What a running vLLM server holds beyond its --gpu-memory-utilization share (CUDA context and the like):
# 320 MiB on an H200, 540-660 MiB on an H100. A static server starts only if the card's free memory
# holds its share, so each server started before it must leave this much beside the shares.
OUTSIDE_SHARE_MOST = 660 * MIB
SHARES_FIX = "lower the static shares (--gpu-memory-utilization, --static-shares or --pair-utilization-b)"


def check_card(nvml: Any, index: int, static: tuple[float, int]) -> Check:
    """Free memory (static pools need their shares) and other processes (they skew readings) on a card."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    others = gpu_processes(nvml, handle)
    free, (static_share, pools) = mem.total - mem.used, static
    shown = f"GPU {index}: {free / MIB:,.0f} of {mem.total / MIB:,.0f} MiB free"
    listed = ", ".join(f"pid {p} {fmt(b and b / MIB)} MiB" for p, b in sorted(others.items()))
    if static_share and free < static_share * mem.total:
        return fail(
            "card",
            f"{shown}: less than the {static_share:g} of the card the static pools of one experiment hold",
            f"free the card ({listed or 'nvidia-smi'}) or {SHARES_FIX}",
        )
    beside = free - static_share * mem.total
    if pools > 1 and beside < (pools - 1) * OUTSIDE_SHARE_MOST:
        return warn(
            "card",
            f"{shown}: {beside / MIB:,.0f} MiB beside the {static_share:g} of the card that {pools} static "
            "pools hold at once; each server started before the last holds up to "
            f"{OUTSIDE_SHARE_MOST / MIB:,.0f} MiB outside its share (CUDA context): the last may not start"
            " (or, asleep, wake)" + (f"; other processes on it: {listed}" if listed else ""),
            SHARES_FIX,
        )
    if others:
        moved = "their memory moves the device totals; per-server figures are unaffected"
        return warn("card", f"{shown}; other processes on it: {listed}", moved)
    return Check("card", True, shown)


# %% Versions: the vLLM the installed kvcached supports, and one model runner for every arm
# kvcached release -> the vLLM releases it supports (kvcached 0.1.6's README: "tested up to v0.30.0";
# its engine-start patch refuses vLLM 0.31 and newer: "kvcached has no runner adapter for vLLM X").
KVCACHED_SUPPORTS_VLLM = {"0.1.6": ((0, 17), (0, 30))}
# The vLLM releases this harness knows: 0.24 run on a real card, 0.25-0.30 against the fakes.
HARNESS_KNOWS_VLLM = ((0, 24), (0, 30))
# vLLM 0.24 runs Llama, Qwen3, Mistral, ... on its Model Runner V2 by default, 0.25-0.28 every dense
# model, 0.29 on every model. kvcached 0.1.6 dies at engine start on V2 before vLLM 0.28, and on V1 after.
KVCACHED_V2_RUNNER_FROM = (0, 28)
KVCACHED_V1_RUNNER_UNTIL = (0, 28)
RUNNER_VARIABLE = "VLLM_USE_V2_MODEL_RUNNER"
V2_RUNNER_LOG_LINE = "Using V2 Model Runner"


def release(version: Optional[str]) -> Optional[tuple[int, int]]:
    """(major, minor) of a version string such as 0.24.0, 0.30.0rc1 or 0.26.0+cu130; None if unknown."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2])) if match else None


def base_version(version: Optional[str]) -> str:
    """'0.1.6' of 0.1.6.post1 or 0.1.6+cu129: the release a table of releases knows."""
    found = re.match(r"\d+(\.\d+)*", version or "")
    return found.group(0) if found else ""


def shown_release(major_minor: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in major_minor)


def shown_range(span: tuple[tuple[int, int], tuple[int, int]]) -> str:
    return f"{shown_release(span[0])}–{shown_release(span[1])}"


def server_versions(cfg: Config, timeout_s: float = 60.0) -> dict[str, Optional[str]]:
    """vllm and kvcached as the servers' Python sees them, from package metadata; {} if it cannot say."""
    call = "import json\nprint(json.dumps(package_versions(('vllm', 'kvcached'))))"
    try:
        code = program_source(package_versions, call=call)
        python = servers_python(server_prefix(cfg)[0])
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout_s)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}


def servers_python(first: str) -> str:
    """The Python a --server-cmd runs: itself, or a script's (`/venv/bin/vllm serve`: its #! line names the
    venv's, whose vLLM may not be ours); this one's where neither says."""
    if Path(first).name.startswith("python"):
        return first
    with contextlib.suppress(OSError, TypeError):
        with open(shutil.which(first) or first, "rb") as script:
            line = script.read(256).split(b"\n")[0].decode(errors="replace")
        words = line[2:].split() if line.startswith("#!") else []
        named = [w for w in words if Path(w).name.startswith("python")]  # also `#!/usr/bin/env python3`
        if named:
            return named[0]
    return sys.executable


def check_versions(found: dict[str, Optional[str]], kvcached_needed: bool) -> Check:
    """vLLM against the range kvcached supports (a failure) and the releases known here (a warning)."""
    vllm, kvcached = found.get("vllm"), found.get("kvcached")
    if release(vllm) is None:
        return warn("versions", "vLLM's version unknown: the servers' Python has no vllm package")
    shown = f"vllm {vllm}" + (f", kvcached {kvcached}" if kvcached_needed and kvcached else "")
    supported = KVCACHED_SUPPORTS_VLLM.get(base_version(kvcached))
    if kvcached_needed and supported and not supported[0] <= release(vllm) <= supported[1]:
        return fail(
            "versions",
            f"kvcached {kvcached} supports vLLM {shown_range(supported)}; found vllm {vllm}",
            f"pip install vllm=={shown_release(supported[1])}.0 (or leave out the kvcached experiments)",
        )
    if kvcached_needed and not supported:
        return warn(
            "versions",
            f"{shown}: which vLLM releases kvcached {kvcached or '(version unknown)'} supports is not known "
            f"here (known: kvcached {', '.join(KVCACHED_SUPPORTS_VLLM)})",
            "see kvcached's README for the vLLM releases it supports",
        )
    if not HARNESS_KNOWS_VLLM[0] <= release(vllm) <= HARNESS_KNOWS_VLLM[1]:
        return warn(
            "versions",
            f"{shown}: this harness knows vLLM {shown_range(HARNESS_KNOWS_VLLM)}; flags, endpoints or log "
            f"lines may differ",
            f"pip install vllm=={shown_release(HARNESS_KNOWS_VLLM[1])}.0 for a release it knows",
        )
    return Check("versions", True, shown + (" (kvcached supports it)" if kvcached_needed else ""))


def model_runner_env(
    vllm_version: Optional[str], kvcached_needed: bool, shell: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """One model runner for every arm (or the shell's): compare KV allocators, not model runners."""
    if RUNNER_VARIABLE in shell:
        return {RUNNER_VARIABLE: shell[RUNNER_VARIABLE]}
    found = release(vllm_version)
    if kvcached_needed and found is not None and found < KVCACHED_V2_RUNNER_FROM:
        return {RUNNER_VARIABLE: "0"}  # V1 for every arm: kvcached dies at start on V2 here
    return {}


def check_model_runner(
    found: dict[str, Optional[str]], kvcached_needed: bool, shell: Mapping[str, str] = os.environ
) -> Check:
    """The runner every server gets, and whether kvcached runs on it (else it fails a minute in)."""
    vllm, kvcached = found.get("vllm"), found.get("kvcached") or "(version unknown)"
    chosen = model_runner_env(vllm, kvcached_needed, shell)
    if not chosen:
        return Check("model runner", True, "vLLM's default for every server")
    setting = chosen[RUNNER_VARIABLE]
    why = "from the shell" if RUNNER_VARIABLE in shell else f"kvcached {kvcached} needs V1 on vllm {vllm}"
    shown = f"{RUNNER_VARIABLE}={setting} for every server ({why})"
    found_release, v2 = release(vllm), setting.strip().lower() in ("1", "true")
    refused = (kvcached_needed and found_release) and (
        found_release < KVCACHED_V2_RUNNER_FROM if v2 else found_release > KVCACHED_V1_RUNNER_UNTIL
    )
    if not refused:
        return Check("model runner", True, shown)
    needs = "runs on Model Runner V2 only from vLLM 0.28" if v2 else "requires Model Runner V2 from vLLM 0.29"
    fix = f"unset {RUNNER_VARIABLE}: the harness then gives every server the runner kvcached needs"
    return fail("model runner", f"{shown}; kvcached {kvcached} {needs}, found vllm {vllm}", fix)


def runner_from_log(log_path: Path) -> Optional[str]:
    """Which model runner a ready vLLM server uses: V2 logs it at engine start, V1 says nothing."""
    try:
        return "V2" if V2_RUNNER_LOG_LINE in log_path.read_text(errors="replace") else "V1"
    except OSError:
        return None


# %% Run set-up: results folder, versions, checks, plans, signals
def new_run_dir(parent: Path, tag: str, now: Optional[_dt.datetime] = None) -> Path:
    """results/<UTC timestamp>_<tag>/, created fresh: an existing folder is never reused."""
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = parent / (f"{stamp}_{tag}" + (f"_{n}" if n else ""))
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path
    raise RuntimeError(f"could not create a fresh run folder under {parent}")


def package_versions(
    names: Iterable[str] = ("vllm", "kvcached", "torch", "nvidia-ml-py", "matplotlib", "numpy"),
) -> dict:
    """Installed versions from package metadata: nothing is imported (no torch in this process)."""
    import contextlib
    from importlib import metadata

    out = dict.fromkeys(names)
    for name in out:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def most_sockets(plans: dict[str, WorkloadPlan], cfg: Config, experiments: list[Experiment]) -> int:
    """Sockets the client may hold at once: the largest burst of any plan, to every model the experiments
    serve at once."""
    largest = max(burst_threads(plan.burst(b)) for plan in plans.values() for b in range(plan.bursts))
    return largest * len(served_slots(cfg, experiments))


def ensure_open_files(concurrent_requests: int, spare: int = 128) -> None:
    """Each request in flight holds a socket: raise the soft open-files limit if needed, or say what to do."""
    needed = concurrent_requests + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return
    raise ConfigError(
        f"{concurrent_requests} requests in flight at once need about {needed} open files, but this shell "
        f"allows at most {hard} (`ulimit -Hn`). Raise it (`ulimit -n {needed}` as allowed, or in "
        "/etc/security/limits.conf) or send fewer at once: --burst-size/--max-burst-size, or with open-loop "
        "arrivals lower --rate(s), --peak-rates or --trace-rate-scale, or name fewer --models."
    )


def prepare_run(cfg: Config, argv: list[str], nvml_module: Any) -> Run:
    """Everything that can fail before a server starts: checks, the card, plans, the run folder."""
    register_secrets(cfg)
    experiments = parse_experiments(cfg.experiments)
    preimport = preimport_on(cfg)
    versions = server_versions(cfg)
    checks, nvml = preflight(cfg, experiments, nvml_module, imports_later=preimport, versions=versions)
    if not all(c.ok for c in checks):
        raise ConfigError("preflight failed, nothing was started (--check repeats it):\n" + checklist(checks))
    say(checklist(checks))
    cards, gpu, plans, budget, model_facts, lanes = plan_run(cfg, experiments, nvml)
    run_dir = new_run_dir(Path(cfg.results_dir), cfg.tag)
    try:
        announce_run(cards, lanes, preimport, run_dir)
        save_plans(run_dir, plans, experiments)
        runner_env = model_runner_env(versions.get("vllm"), needs_kvcached(experiments))
        run = Run(cfg, experiments, nvml, plans, budget, run_dir, {}, lanes, runner_env)
        run.import_checks = import_checks_beside(cfg, experiments) if preimport else None
        run.config = run_config(run, argv, gpu, cards, model_facts, versions)
        run.save_config()
    except BaseException:  # a signal meanwhile: nothing was measured, so no folder is left behind
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run


def plan_run(cfg: Config, experiments: list[Experiment], nvml: Any) -> tuple:
    """What a run settles after its checklist, each of which may still refuse it (--check too): the cards
    alike, the plans, the lanes, enough open files. Returns (cards, the fullest card, plans, the overload
    budget, model facts, lanes)."""
    cards = [gpu_facts(nvml, index) for index in gpu_indices(cfg)]
    mixed_cards(cards, cfg.allow_mixed_gpus)  # refused unless --allow-mixed-gpus
    gpu = min(cards, key=lambda card: card["free_mib_at_start"])  # plans fit the fullest card
    plans, budget, model_facts = make_plans(cfg, gpu)
    per_card = plan_lanes(experiments, cfg, budget, plans["main"].bursts, len(cards))
    lanes = [
        Lane(lane_config(cfg, k, card["index"]), card, exps)
        for k, (card, exps) in enumerate(zip(cards, per_card))
        if exps
    ]
    ensure_open_files(most_sockets(plans, cfg, experiments))
    return cards, gpu, plans, budget, model_facts, lanes


def announce_run(cards: list[dict], lanes: list[Lane], preimport: bool, run_dir: Path) -> None:
    for card in cards:
        say(
            f"GPU {card['index']}: {card['name']}, {card['total_mib']:,.0f} MiB, "
            f"{card['used_mib_at_start']:,.0f} MiB used before we start"
        )
    for lane in lanes if len(lanes) > 1 else []:
        say(
            f"  GPU {lane.cfg.gpu_index} runs {', '.join(e.name for e in lane.experiments)} "
            f"(ports {'/'.join(str(port_of(lane.cfg, s)) for s in slots(lane.cfg))})"
        )
    if preimport:
        say(
            "each next server imports vLLM while the experiment before it runs, the first ones while vLLM's "
            "import is checked (--preimport off to wait instead)"
        )
    say(f"results in {run_dir}")


def run_config(
    run: Run, argv: list[str], gpu: dict, cards: list[dict], model_facts: dict, versions: dict
) -> dict:
    """What config.json holds at the start (secrets redacted); servers and timing are added as they come."""
    cfg = run.cfg
    command = [sys.executable, "run_experiments.py", *argv]
    return {
        "run_name": run.run_dir.name,
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "command": shlex.join(redact_argv(command)),
        "notebook": running_in_notebook(),
        "config": {
            **dataclasses.asdict(cfg),
            "api_key": REDACTED if cfg.api_key else "",
            "server_cmd": redact_command(cfg.server_cmd),
            "extra_server_args": redact_command(cfg.extra_server_args),
            "kvcached_env": redact_env_pairs(cfg.kvcached_env),
        },
        "gpu": gpu,
        "versions": {"python": sys.version.split()[0], **package_versions()},
        "host": socket.gethostname(),
        "experiments": [e.name for e in run.experiments],
        "models": model_facts,
        "plans": {k: plan_summary(p) for k, p in run.plans.items()},
        "overload_budget_bytes": run.budget,
        "kvcached_env_seen": redact_env({k: v for k, v in os.environ.items() if k.startswith("KVCACHED_")}),
        "servers": {},
        "gpus": cards,
        "mixed_gpus": mixed_cards(cards, cfg.allow_mixed_gpus),
        "preimport_on": run.import_checks is not None,
        "engine_start": engine_start_method(cfg),
        "cpu_cores": usable_cores(),
        "lanes": [
            {
                "gpu_index": lane.cfg.gpu_index,
                "gpu_uuid": lane.gpu["uuid"],
                "ports": [port_of(lane.cfg, s) for s in slots(lane.cfg)],
                "experiments": [e.name for e in lane.experiments],
            }
            for lane in run.lanes
        ],
        "server_versions": versions,
        "model_runner_env": run.runner_env,
    }


def mixed_cards(cards: list[dict], allow_mixed: bool) -> bool:
    """Whether the cards differ (only with --allow-mixed-gpus: unlike cards' figures don't compare)."""
    kinds = {(card["name"], round(card["total_mib"])) for card in cards}
    if len(kinds) > 1 and not allow_mixed:
        listed = "; ".join(f"GPU {c['index']}: {c['name']}, {c['total_mib']:,.0f} MiB" for c in cards)
        raise ConfigError(
            f"--gpus: the cards differ ({listed}). Compare arms on one kind of card, or pass "
            f"--allow-mixed-gpus (recorded in config.json)"
        )
    return len(kinds) > 1


class NoSuchCard(ConfigError):
    """A --gpu-index or --gpus entry this machine has no card for."""


def open_gpu(nvml_module: Any, indices: list[int], flag: str) -> Any:
    """NVML, started, once each of `indices` (from `flag`) is known to name a card of this machine."""
    try:
        nvml = load_nvml(nvml_module)
    except Exception as exc:
        raise ConfigError(
            f"cannot read the GPU through NVML ({exc!r}). This script measures GPU memory and "
            f"needs an NVIDIA GPU with its driver; `--report RUN_DIR` works without one."
        ) from exc
    count = nvml.nvmlDeviceGetCount()
    for index in indices:
        if index >= count:
            raise NoSuchCard(
                f"{flag}: GPU index {index} out of range: this machine has {count} "
                f"GPU{'s' if count != 1 else ''} (0-{count - 1})"
            )
    return nvml


def pin_to_card(gpu: dict, index: int) -> dict[str, str]:
    """The servers' CUDA_VISIBLE_DEVICES: a UUID names the card NVML measures (CUDA numbers its own)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "", gpu["uuid"]):
        say(
            f"note: servers run on GPU {index} ({gpu['uuid']}), the card measured; "
            f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} from the shell is overridden "
            f"(choose the card with --gpu-index)"
        )
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpu["uuid"]}


def workload_sizing(cfg: Config, kv_a: Optional[int], gpu: dict) -> tuple[int, str]:
    """A closed burst's size and, in words, how it (or the open-loop traffic) was chosen."""
    if cfg.arrivals == "trace":
        window = f"seconds {cfg.trace_window}" if cfg.trace_window else "all of it"
        return 0, (
            f"trace replay: {', '.join(Path(f).name for f in trace_files(cfg))} (one per model, cycled), "
            f"{window}, {cfg.trace_speedup:g}x faster, at {cfg.trace_rate_scale} x its rate, one window per "
            "scale"
        )
    if cfg.arrivals == "ramp":
        return 0, (
            f"ramp: each model rises to {cfg.peak_rates} requests/s and back in steps of "
            f"{cfg.ramp_step:g} a second, one window per peak, the models staggered"
        )
    if cfg.arrivals != "bursts":
        rates = parse_rates_per_model(cfg) if cfg.rates_per_model else parse_rates(cfg)
        each = " (each model its own, all at once)" if cfg.rates_per_model else ""
        return 0, (
            f"open loop: {cfg.arrivals} arrivals at {', '.join(f'{r:g}' for r in rates)} "
            f"requests/s{each}, {cfg.duration_s:g} s per window"
            + (f", burstiness {cfg.burstiness:g}" if cfg.arrivals == "gamma" else "")
        )
    if cfg.burst_size:
        return cfg.burst_size, f"{cfg.burst_size} concurrent requests ({cfg.preset} preset or --burst-size)"
    longest, prompt = request_lengths(cfg)  # as the plan will send them
    free = int(gpu["free_mib_at_start"] * MIB)
    return size_burst(kv_a, free, prompt, longest, cfg.burst_kv_fraction, cfg.max_burst_size)


def capped_mix_note(cfg: Config, plan: WorkloadPlan) -> Optional[str]:
    """A lognormal mix is cut at --max-tokens: how far that moved its mean (lognormal:128,0.6 with the
    default 128 puts 40% of the requests at the cap and averages 99 tokens, not 128)."""
    if not cfg.output_tokens_dist.startswith("lognormal"):
        return None
    lengths = [r.max_tokens for r in plan.requests]
    capped = sum(n >= cfg.max_tokens for n in lengths)
    if not capped:
        return None
    return (
        f"  output lengths: {capped} of {len(lengths)} requests cut to --max-tokens {cfg.max_tokens}, a mean "
        f"of {math.fsum(lengths) / len(lengths):.1f} tokens (raise --max-tokens for the mix's own mean)"
    )


def refuse_empty_plans(cfg: Config, plans: dict[str, WorkloadPlan], served: list[str]) -> None:
    """A workload that plans no request at all measures nothing: say which flag thinned it to none."""
    family = per_model_family(cfg)
    silent = [slot for slot in served if family and not plans[f"{family}_{slot}"].requests]
    empty = ["the workload"] if not plans["main"].requests else [f"model {slot}'s" for slot in silent]
    flag = {"trace": "trace_rate_scale", "ramp": "peak_rates"}.get(cfg.arrivals, "rate")
    flag = "rates_per_model" if cfg.rates_per_model else flag
    what = "choose another --trace-window" if cfg.arrivals == "trace" else "give a longer --duration-s"
    need(
        not empty,
        flag,
        f"{empty[0] if empty else ''} plan holds no request in any window: raise it, or {what}",
    )


def make_plans(cfg: Config, gpu: dict) -> tuple[dict[str, WorkloadPlan], int, dict]:
    facts = {}
    for key in slots(cfg):
        model_config, source = load_model_config(model_of(cfg, key))
        kv = kv_bytes_per_token(model_config) if model_config else None
        facts[key] = {"model": model_of(cfg, key), "config_source": source, "kv_bytes_per_token": kv}
    kv_a = facts["A"]["kv_bytes_per_token"]
    open_loop = cfg.arrivals != "bursts"
    size, sizing = workload_sizing(cfg, kv_a, gpu)
    family = per_model_family(cfg)
    if family:  # the shared experiments send every model's plan; one model alone, A's
        build = {"ramp": ramp_plan, "trace": trace_plan, "open": lambda c, i, why: open_loop_plan(c, why, i)}
        plans = {f"{family}_{key}": build[family](cfg, i, sizing) for i, key in enumerate(slots(cfg))}
        for key, plan in plans.items():
            if clipped := sum(r.clipped for r in plan.requests):
                fit = f"clipped to fit --max-model-len {cfg.max_model_len}"
                say(f"  {key}: {clipped} of {len(plan.requests)} requests {fit}")
        plans["main"] = plans[f"{family}_A"]
    else:
        plans = {"main": open_loop_plan(cfg, sizing) if open_loop else plan_workload(cfg, size, sizing)}
    served = served_slots(cfg, parse_experiments(cfg.experiments))  # experiments 1 and 2 alone: A only
    refuse_empty_plans(cfg, plans, served)
    budget = int(cfg.overload_budget_gib * GIB)
    for key in slots(cfg) if overload_lengths(cfg, cfg.max_model_len)[1] >= OVERLOAD_LEAST_PROMPT else ():
        plans[f"overload_{key}"] = overload_plan(cfg, facts[key]["kv_bytes_per_token"], budget, key)
        if not facts[key]["kv_bytes_per_token"]:
            say(f"  {unknown_kv_warning(key)}")
    say_workload(cfg, plans, [f"{family}_{key}" for key in served] if family else ["main"])
    say(f"  why: {sizing}")
    if note := capped_mix_note(cfg, plans["main"]):
        say(note)
    for key in [slot for slot in slots(cfg)[1:] if slot in served]:
        kv = facts[key]["kv_bytes_per_token"]
        if kv and kv_a:
            say(f"  model {key} needs {kv / kv_a:.1f}x model A's KV per token in the shared experiments")
    return plans, budget, facts


def save_plans(run_dir: Path, plans: dict[str, WorkloadPlan], experiments: list[Experiment]) -> None:
    """The plans the chosen experiments send, prompts included (gzipped: they are most of the bytes), and
    the main one, whose windows every schedule is resolved with (a card's process of --gpus reads them)."""
    used = {"main", *(plan for e in experiments for plan in e.plans), *PER_MODEL_ARRIVALS, "open"}
    for key in sorted(k for k in plans if plan_family(k) in used):
        payload = json.dumps(dataclasses.asdict(plans[key])).encode()
        (run_dir / f"plan_{key}.json.gz").write_bytes(gzip.compress(payload))


def plan_family(key: str) -> str:
    """What an experiment's `plans` name: 'main', or 'overload' for overload_A, overload_B, ..."""
    return key.split("_", 1)[0]


def load_plans(run_dir: Path) -> dict[str, WorkloadPlan]:
    plans = {}
    for path in sorted(run_dir.glob("plan_*.json.gz")):
        data = json.loads(gzip.decompress(path.read_bytes()))
        data.update(requests=tuple(PlannedRequest(**r) for r in data["requests"]), rates=tuple(data["rates"]))
        plans[path.name[5:-8]] = WorkloadPlan(**data)
    return plans


def plan_summary(plan: WorkloadPlan) -> dict:
    out = {**dataclasses.asdict(plan), "requests": len(plan.requests)}
    clipped = sum(r.clipped for r in plan.requests)
    return {**out, "clipped": clipped} if clipped else out


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_stop_signals() -> dict:
    """Ctrl-C, SIGTERM and SIGHUP end the run through the finally-blocks that stop the servers. During a
    stop the first signal ends the run once the stop is done, any further one kills the servers at once."""

    def handler(signum, frame):
        STATE.signals_seen += 1
        if not STATE.stopping.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        STATE.interrupt_pending.set()
        if STATE.signals_seen > 1 and not STATE.hurry.is_set():
            STATE.hurry.set()
            say("\n  signalled again: killing the servers now")

    previous = {}
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    return previous


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """install_stop_signals for a stretch of the run, outside a notebook (its kernel owns the signals)."""
    previous = {} if running_in_notebook() else install_stop_signals()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def quiet_stdout() -> None:
    """stdout, and what its buffer still holds, to /dev/null: after a closed terminal or pipe every later
    line would fail, and so would the last flush at exit, which turns exit code 130 into 120."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def caused_by_a_signal(exc: Optional[BaseException]) -> bool:
    """Whether a KeyboardInterrupt (see install_stop_signals) is in exc's chain. One raised inside
    threading's own lock handling can come out as another error: a Condition it left released, say,
    raises RuntimeError("release unlocked lock") on the way out."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


# %% Entry point: the only cell that starts processes or writes files
if __name__ == "__main__":
    if not running_in_notebook():
        sys.exit(main())
    main(notebook_argv())

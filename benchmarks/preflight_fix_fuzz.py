"""Random configurations against the preflight's room checks, on the fake card: how often they refuse,
how often the fix names flags, and whether the flags of every fix, applied together, make --check pass.

    python benchmarks/preflight_fix_fuzz.py [--cases 300] [--seed 1] [--port 18950]

Each case draws a card size (16 GB to 141 GB), two or three models of four real shapes (Qwen2.5-0.5B,
1.5B and 7B, Llama-3.1-8B; config.json only), --max-model-len, the experiments and maybe the static
shares, and runs run_experiments.main(["--check", ...]) in this process against tests/fakes/pynvml.py.
Prints one line of counts, then each case whose fixes did not pass. No GPU is needed.
"""

import argparse
import io
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from contextlib import redirect_stderr
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "fakes")]

import pynvml  # noqa: E402  (the fake)
from model_shapes import LLAMA_8B, QWEN_7B, QWEN_HALF_B, QWEN_ONE_AND_HALF_B  # noqa: E402  (benchmarks/)

import run_experiments as rx  # noqa: E402

SHAPES = {"0.5b": QWEN_HALF_B, "1.5b": QWEN_ONE_AND_HALF_B, "7b": QWEN_7B, "8b": LLAMA_8B}
CARDS_MIB = (15360, 16384, 24576, 40960, 81559, 143771)
EXPERIMENTS = ("all", "2", "4", "2,4", "4,7", "6,7", "3", "5", "1,2", "seed")
ROOM_FAILURE = re.compile(r"✗ (models fit|static split): (.*)\n +fix: (.*)")
FIX_FLAG = re.compile(r"--[a-z-]+ [0-9.]+(?:,[0-9.]+)*")


def random_case(rng: random.Random, folders: dict[str, str]) -> tuple[int, list[str]]:
    models = [folders[rng.choice(list(SHAPES))] for _ in range(rng.choice((2, 2, 3)))]
    flags = ["--models", ",".join(models), "--max-model-len", str(rng.choice((2048, 8192, 32768)))]
    flags += ["--experiments", rng.choice(EXPERIMENTS)]
    if rng.random() < 0.7:
        flags += ["--gpu-memory-utilization", f"{round(rng.uniform(0.05, 0.95), 2):g}"]
    if len(models) == 2 and rng.random() < 0.3:
        flags += ["--pair-utilization-b", f"{round(rng.uniform(0.05, 0.9), 2):g}"]
    elif rng.random() < 0.2:
        shares = [round(rng.uniform(0.05, 0.9 / len(models)), 2) for _ in models]
        flags += ["--static-shares", ",".join(f"{s:g}" for s in shares)]
    return rng.choice(CARDS_MIB), flags


def check(card_mib: int, flags: list[str], port: int) -> tuple[int, str]:
    os.environ["FAKE_GPU_TOTAL_MIB"] = str(card_mib)
    lines: list[str] = []
    server = ["--server-cmd", f"python3 -S {ROOT}/tests/fakes/fake_vllm_server.py", "--port", str(port)]
    with redirect_stderr(io.StringIO()):
        code = rx.main(["--check", *server, *flags], nvml_module=pynvml, out=lines.append)
    return code, "\n".join(map(str, lines))


def fix_flags(out: str, flags: list[str]) -> list[str]:
    """The flags every failed room check names, shared_static left out where one says so; none where one of
    them names no flag (its fix is a smaller model or fewer experiments)."""
    named = []
    for _, _, fix in ROOM_FAILURE.findall(out):
        these = [part for flag in FIX_FLAG.findall(fix) for part in flag.split()]
        if not these:
            return []
        named += these
        if these and "shared_static left out" in fix:
            chosen = rx.parse_experiments(flags[flags.index("--experiments") + 1])
            named += ["--experiments", ",".join(e.name for e in chosen if e.name != "shared_static")]
    return named


def model_folders(tmp: str) -> dict[str, str]:
    folders = {}
    for name, shape in SHAPES.items():
        (Path(tmp) / name).mkdir()
        (Path(tmp) / name / "config.json").write_text(json.dumps({**shape, "torch_dtype": "bfloat16"}))
        folders[name] = str(Path(tmp) / name)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=18950, help="model A's; B and C take the next ones")
    args = parser.parse_args()
    rng, counts, misses = random.Random(args.seed), Counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FAKE_GPU_DIR"] = tmp
        folders = model_folders(tmp)
        for _ in range(args.cases):
            card, flags = random_case(rng, folders)
            code, out = check(card, flags, args.port)
            counts["passed"] += code == 0
            counts["refused"] += code == 2 and bool(ROOM_FAILURE.search(out))
            named = fix_flags(out, flags) if code == 2 else []
            counts["flags"] += bool(named)
            if named and check(card, flags + named, args.port)[0] == 0:
                counts["fixed"] += 1
            elif named:
                misses.append(f"{card} MiB: {' '.join(flags + named).replace(tmp + '/', '')}")
    print(
        f"{args.cases} cases: {counts['passed']} pass --check, {counts['refused']} refused by a room check, "
        f"{counts['flags']} of those with flags in the fix, {counts['fixed']} of which pass with them"
    )
    print("\n".join(f"- fix did not pass: {m}" for m in misses) or "every fix that names flags passes")


if __name__ == "__main__":
    main()

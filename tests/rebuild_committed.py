"""Rebuild the golden committed run's summaries with --report, in a fresh copy, and say whether they
came out exactly as committed; check that every other committed run folder still parses:
python tests/rebuild_committed.py OUT_DIR (run by the tests in a process of its own, so it goes on while
the others run; exit 1 when the golden run's summary.json or summary.md differ by a byte).

One golden run is compared byte for byte: the newest complete reference (all eight experiments). The
other folders hold raw formats of their own (older runs, killed runs, open-loop arrivals): each must
still load, without comparing its summaries. A small folder goes through --report as a whole (cheap); a
large one only has its raw files loaded (summarizing a full reference run takes seconds). A folder whose
raw files have the shape of one already loaded or rebuilt (the same keys and types of values, e.g. the
second reference run of the same commit) is not loaded again."""

import itertools
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402

GOLDEN = ROOT / "results" / "20261128T214012Z_reference_check" / "20261128T214032Z_reference_1"
# raw files (.jsonl, .jsonl.gz, as stored) of a folder that goes through --report as a whole; larger ones
# are loaded file by file (the tutorial's three on an H100 are rebuilt byte for byte through the CLI by
# test_report_command_rebuilds_a_committed_run)
REPORT_WHOLE_BELOW_BYTES = 2**16


def committed_runs() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "results").rglob("config.json"))


def fresh_copy(reference: Path, into: Path) -> Path:
    copy = into / reference.name  # summaries name their folder: keep it
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns("*.png"))
    (copy / "summary.json").unlink()
    (copy / "summary.md").unlink()
    return copy


def committed_experiments(reference: Path) -> list[str]:
    return sorted(json.loads((reference / "summary.json").read_text())["experiments"])


def rebuild(reference: Path, into: Path) -> dict:
    copy = fresh_copy(reference, into)
    rc = rx.main(["--report", str(copy)], out=lambda _: None)
    return {
        "rc": rc,
        "copy": str(copy),
        "json_same": (copy / "summary.json").read_bytes() == (reference / "summary.json").read_bytes(),
        "md_same": (copy / "summary.md").read_bytes() == (reference / "summary.md").read_bytes(),
    }


def raw_bytes(reference: Path) -> int:
    return sum(p.stat().st_size for p in reference.rglob("*.jsonl*"))


def parse(reference: Path, into: Path) -> dict:
    """The folder's raw files still load: through --report as a whole when small, else one by one."""
    if raw_bytes(reference) < REPORT_WHOLE_BELOW_BYTES:
        copy = fresh_copy(reference, into)
        rc = rx.main(["--report", str(copy)], out=lambda _: None)
        experiments = committed_experiments(copy) if rc == 0 else None
        return {"how": "report", "rc": rc, "copy": str(copy), "experiments": experiments}
    config, problem = rx.read_json(reference / "config.json")
    loaded = [rx.load_experiment(d) for d in sorted(reference.glob("[0-9][0-9]_*")) if d.is_dir()]
    return {
        "how": "load",
        "rc": 0,
        "copy": str(reference),
        "experiments": sorted(e.record.name for e in loaded),
        "problems": [problem] * bool(problem) + [p for e in loaded for p in e.problems],
        "empty": [e.path.name for e in loaded if not e.device or not e.requests],
    }


def shape(row: dict) -> tuple:
    """A row's keys with the type of each value (None where absent, e.g. a closed burst's rate)."""
    return tuple(sorted((key, type(value).__name__) for key, value in row.items()))


def first_rows(path: Path, count: int) -> list[dict]:
    """The first rows of a JSONL file or of its gzipped copy, without reading the rest."""
    opened = rx.open_jsonl(path)
    if opened is None:
        return []
    with opened:
        return [json.loads(line) for line in itertools.islice(opened, count) if line.strip()]


def rows_shape(path: Path) -> tuple:
    """The shapes of a JSONL file's rows, one per kind of row, from its first lines."""
    kinds: dict = {}
    for row in first_rows(path, 400):
        kinds.setdefault(row.get("kind"), shape(row))
    return tuple(sorted(kinds.items(), key=str))


def raw_format(reference: Path) -> tuple:
    """What a folder's raw files look like: the shapes of config.json, of each experiment.json and
    its marks, and of each kind of row. Two folders with the same format parse alike."""
    config, _ = rx.read_json(reference / "config.json")
    shapes = {shape(config or {})}
    for exp in sorted(reference.glob("[0-9][0-9]_*")):
        record, _ = rx.read_json(exp / "experiment.json")
        marks = (record or {}).get("marks") or {}
        shapes.update({shape(record or {}), shape(marks), *(shape(b) for b in marks.get("bursts") or [])})
        shapes.update((name, rows_shape(exp / name)) for name in ("memory.jsonl", "requests.jsonl"))
    return tuple(sorted(shapes, key=str))


def main(out: Path) -> dict:
    # Summaries are compared, not images: the plots are laid out as in a real report but not rendered
    # to PNG (the slow part; the end-to-end runs check that plots are written).
    rx.save_figure = lambda fig, path: path
    results, seen = {}, {}
    for number, reference in enumerate(committed_runs()):
        name = str(reference.relative_to(ROOT / "results"))
        form = raw_format(reference)
        if reference == GOLDEN:
            results[name] = dict(rebuild(reference, out / str(number)), how="rebuild")
        elif form in seen:  # the raw files of another folder, in the same format, are parsed in full
            results[name] = {"how": "same format", "as": seen[form], "rc": 0}
            continue
        else:
            results[name] = parse(reference, out / str(number))
        seen[form] = name
    (out / "rebuilds.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    golden = main(Path(sys.argv[1]))[str(GOLDEN.relative_to(ROOT / "results"))]
    if not (golden["json_same"] and golden["md_same"]):
        sys.exit(
            f"the golden run's summaries differ from the committed ones: "
            f"compare {golden['copy']} with {GOLDEN}"
        )

"""Rebuild the golden committed run's summaries with --report, in a fresh copy, and say whether they
came out exactly as committed; check that every other committed run folder still parses:
python tests/rebuild_committed.py OUT_DIR (run by the tests in a process of its own, so it goes on while
the others run).

One golden run is compared byte for byte: the newest complete reference (all eight experiments). The
other folders hold raw formats of their own (older runs, killed runs, open-loop arrivals): each must
still load, without comparing its summaries. A small folder goes through --report as a whole (cheap); a
large one only has its raw files loaded (summarizing a full reference run takes seconds)."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402

GOLDEN = ROOT / "results" / "20261128T214012Z_reference_check" / "20261128T214032Z_reference_1"
# raw files (.jsonl, .jsonl.gz, as stored) of a folder that goes through --report as a whole; larger ones
# are loaded file by file (the open-loop reference is rebuilt byte for byte by its own test)
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
        "json_same": json.loads((copy / "summary.json").read_text())
        == json.loads((reference / "summary.json").read_text()),
        "md_same": (copy / "summary.md").read_text() == (reference / "summary.md").read_text(),
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


def main(out: Path) -> None:
    # Summaries are compared, not images: the plots are laid out as in a real report but not rendered
    # to PNG (the slow part; the end-to-end runs check that plots are written).
    rx.save_figure = lambda fig, path: path
    results = {}
    for number, reference in enumerate(committed_runs()):
        name = str(reference.relative_to(ROOT / "results"))
        if reference == GOLDEN:
            results[name] = dict(rebuild(reference, out / str(number)), how="rebuild")
        else:
            results[name] = parse(reference, out / str(number))
    (out / "rebuilds.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

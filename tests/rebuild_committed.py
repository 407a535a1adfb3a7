"""Rebuild every committed run folder's summaries with --report, each in a fresh copy, and say
whether they came out exactly as committed: python tests/rebuild_committed.py OUT_DIR
(run by the tests in a process of its own, so it goes on while the others run)."""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import run_experiments as rx  # noqa: E402


def committed_runs() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "results").rglob("config.json"))


def rebuild(reference: Path, into: Path) -> dict:
    copy = into / reference.name  # summaries name their folder: keep it
    shutil.copytree(reference, copy, ignore=shutil.ignore_patterns("*.png"))
    (copy / "summary.json").unlink()
    (copy / "summary.md").unlink()
    rc = rx.main(["--report", str(copy)], out=lambda _: None)
    return {
        "rc": rc,
        "copy": str(copy),
        "json_same": json.loads((copy / "summary.json").read_text())
        == json.loads((reference / "summary.json").read_text()),
        "md_same": (copy / "summary.md").read_text() == (reference / "summary.md").read_text(),
    }


def main(out: Path) -> None:
    # Summaries are compared, not images: the plots are laid out as in a real report but not rendered
    # to PNG (the slow part; the end-to-end runs check that plots are written).
    rx.save_figure = lambda fig, path: path
    results = {}
    for number, reference in enumerate(committed_runs()):
        results[str(reference.relative_to(ROOT / "results"))] = rebuild(reference, out / str(number))
    (out / "rebuilds.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""The ``flexigpt`` command: one subcommand per pipeline stage, plus tools.

Stage subcommands run the matching thin script in ``<project>/stages/`` (the same one
``dvc.yaml`` calls), from the project root, so ``flexigpt prepare-calibration`` and
``dvc repro prepare_calibration`` do the same work.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

STAGES = ["import_model", "prepare_calibration"]


def project_root() -> Path:
    """The folder holding ``stages/``: the cwd if it has one, else the source checkout."""
    for cand in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (cand / "stages").is_dir():
            return cand
    sys.exit("error: no stages/ folder found; run flexigpt from the project root")


def _run_stage(name: str, params: str | None) -> None:
    root = project_root()
    if params:
        os.environ["FLEXIGPT_PARAMS"] = str(Path(params).resolve())
    os.chdir(root)
    sys.argv = [f"stages/{name}.py"]
    runpy.run_path(str(root / "stages" / f"{name}.py"), run_name="__main__")


def _fetch_text(args: argparse.Namespace) -> None:
    """Snapshot a hub text dataset to jsonl so DVC can hash it (online only)."""
    from .errors import FlexiError
    from .fileio import atomic_file
    from .textdata import read_hub
    import json

    try:
        src = read_hub(args.spec, args.text_field, "spec")
    except FlexiError as e:
        sys.exit(f"error: {e}")
    with atomic_file(args.out) as tmp, open(tmp, "w") as f:
        for d in src.docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"wrote {len(src.docs)} documents to {args.out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="flexigpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for s in STAGES:
        sp = sub.add_parser(s.replace("_", "-"), help=f"run the {s} stage (reads params.yaml)")
        sp.add_argument("--params", help="params file (default: params.yaml in the project root)")
    ft = sub.add_parser("fetch-text", help="download a hub text dataset to jsonl (online)")
    ft.add_argument("spec", help="hf:NAME[:CONFIG]:SPLIT")
    ft.add_argument("--out", required=True, help="jsonl file to write")
    ft.add_argument("--text-field", default="text")
    args = ap.parse_args(argv)
    if args.cmd == "fetch-text":
        _fetch_text(args)
    else:
        _run_stage(args.cmd.replace("-", "_"), args.params)


if __name__ == "__main__":
    main()

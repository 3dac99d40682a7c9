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

from flexigpt.config import preset_flags  # noqa: F401  (`flexigpt preset`; tests import it from here)

STAGES = ["import_model", "prepare_calibration", "score_importance", "prune", "svd_init", "train_adapters", "evaluate",
          "compare"]


def project_root() -> Path:
    """The folder holding ``stages/``: the cwd if it has one, else the source checkout."""
    for cand in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (cand / "stages").is_dir():
            return cand
    sys.exit("error: no stages/ folder found; run flexigpt from the project root")


def _run_stage(name: str, params: str | None, extra: list[str]) -> None:
    root = project_root()
    if params:
        os.environ["FLEXIGPT_PARAMS"] = str(Path(params).resolve())
    os.chdir(root)
    sys.argv = [f"stages/{name}.py", *extra]
    sys.path.insert(0, str(root / "stages"))  # as `python stages/<name>.py` would: its sibling _env.py
    runpy.run_path(str(root / "stages" / f"{name}.py"), run_name="__main__")


def _fetch_text(args: argparse.Namespace) -> None:
    """Snapshot a hub text dataset to jsonl so DVC can hash it (online only)."""
    from flexigpt.errors import FlexiError
    from flexigpt.fileio import atomic_file
    from flexigpt.data.text import read_hub
    import json

    from flexigpt.fileio import check_replaceable

    try:
        check_replaceable(args.out, kind="file", param="--out")  # before the download, and never over a folder
        src = read_hub(args.spec, args.text_field, "spec")
        with atomic_file(args.out) as tmp, open(tmp, "w") as f:
            for d in src.docs:
                f.write(json.dumps({"text": d}) + "\n")
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {len(src.docs)} documents to {args.out}")


def _lineage(args: argparse.Namespace) -> None:
    import mlflow

    from flexigpt.track import lineage
    from flexigpt.track.uri import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(project_root()))
    client = mlflow.MlflowClient()
    run = lineage.find_run(client, args.what, args.stage)
    if run is None:
        sys.exit(f"error: no run or metric named {args.what!r} in {tracking_uri(project_root())}\n"
                 "  fix: pass a run id, or a metric key as shown by `dvc metrics show` / the MLflow UI")
    metric = None if run.info.run_id == args.what else args.what
    print(lineage.describe(client, run, metric))


def _check(path: str) -> None:
    from flexigpt.config import Params
    from flexigpt.errors import FlexiError
    from flexigpt.pipeline import schema

    try:
        n = len(schema.check(Params.load(path)))
    except FlexiError as e:
        sys.exit(f"error: {e}")
    print(f"{path}: {n} sections valid")


def _link_data() -> None:
    from flexigpt.config import Params
    from flexigpt.errors import FlexiError
    from flexigpt.pipeline.stagekit import link_exp_data

    root = project_root()
    try:
        link = link_exp_data(Params.load(root / "params.yaml"), root)
    except FlexiError as e:
        sys.exit(f"error: {e}")
    for path in link:
        print(f"linked {path} -> {path.resolve()} (for dvc exp run --temp/--queue)")


def _report(args: argparse.Namespace) -> None:
    """The study table of finished DVC experiments: per-variant mean ± std, paired verdicts."""
    from flexigpt.errors import FlexiError
    from flexigpt.report import experiments, study

    root = project_root()
    try:
        groups = study.collect(experiments.list_experiments(root, args.exp))
        text = study.study_table(groups, n_boot=args.n_boot)
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    for target in [*([args.write] if args.write else []), *(["README.md"] if args.readme else [])]:
        path = Path(target) if Path(target).is_absolute() else root / target
        old = path.read_text() if path.is_file() else ""
        path.write_text(study.replace_block(old, text))
        print(f"wrote the study table into {path} (between {study.BEGIN} and {study.END})", file=sys.stderr)


def _study(args: argparse.Namespace) -> None:
    """Queue one `dvc exp run` per combination of a declarative study (configs/studies/NAME.yaml)."""
    import subprocess

    from flexigpt.errors import FlexiError
    from flexigpt.report import experiments

    root = project_root()
    path = Path(args.name) if args.name.endswith(".yaml") else root / experiments.STUDIES_DIR / f"{args.name}.yaml"
    try:
        st = experiments.load_study(path, root)
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cmds = experiments.study_commands(st)
    print(f"# {st.name}: {st.description.strip()} ({len(cmds)} experiments)")
    for cmd in cmds:
        print(experiments.format_command(cmd))
        if not args.dry_run:
            res = subprocess.run(cmd, cwd=root)
            if res.returncode != 0:
                sys.exit(res.returncode)  # dvc has said why
    names = " ".join(f"--exp {c[-1]}" for c in cmds)
    if args.dry_run:
        print("# dry run: nothing queued")
    else:
        print(f"# queued; now run: dvc queue start -j 1   (progress: dvc queue status)\n"
              f"# then: flexigpt report {names}")


# library param -> the generate subcommand's flag, so an error names what the user typed
_GENERATE_FLAGS = {"prompt": "--prompt", "max_new_tokens": "--max-new-tokens", "draft_tokens": "--draft-tokens",
                   "speculative": "--speculative", "skip": "--skip", "checkpoint": "--model",
                   "sampling": "--temperature"}


def _generate(args: argparse.Namespace) -> None:
    """Greedy decoding of a saved model, optionally self-speculative (flexigpt.serve); errors exit 2."""
    from flexigpt.errors import FlexiError

    try:
        text, stats = _generate_text(args)
    except FlexiError as e:
        e = FlexiError(_GENERATE_FLAGS.get(e.param, e.param), e.problem, e.fix)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    if args.speculative:
        print(f"speculative: K={stats.draft_tokens} skipped blocks {stats.skipped}: accepted {stats.accepted}/"
              f"{stats.drafted} drafted tokens ({100 * stats.acceptance_rate:.1f}%), {stats.rounds} rounds, "
              f"{stats.tokens_per_round:.2f} tokens/round", file=sys.stderr)


def _generate_text(args: argparse.Namespace):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from flexigpt.errors import FlexiError
    from flexigpt.model import checkpoint
    from flexigpt.serve import check_greedy, generate

    folder = Path(args.model)
    check_greedy({"do_sample": args.do_sample, "temperature": args.temperature})  # before any loading
    try:
        skip = [int(x) for x in args.skip.split(",")] if args.skip else None
    except ValueError:
        raise FlexiError("skip", f"{args.skip!r} is not a comma-separated list of block positions",
                         "write e.g. --skip 12,15,18") from None
    if (folder / checkpoint.MANIFEST).is_file():
        model = checkpoint.load(folder)
    elif (folder / "config.json").is_file():
        from flexigpt.model.importer import load_plain

        model = load_plain(folder)[0]
    else:
        raise FlexiError("checkpoint", f"{folder} holds no model ({checkpoint.MANIFEST} or config.json)",
                         "point --model at a compact folder (artifacts/trained/flexigpt) or a HF folder")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        raise FlexiError("checkpoint", f"{folder} has no tokenizer files",
                         "save the model with its tokenizer (flexigpt.save(model, path, tokenizer=tok))") from None
    hf_logging.set_verbosity_error()  # transformers' generate() notices are not the user's business here
    ids = tok(args.prompt, return_tensors="pt").input_ids
    out, stats = generate(model, ids, args.max_new_tokens, speculative=args.speculative,
                          draft_tokens=args.draft_tokens, skip=skip, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="flexigpt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for s in STAGES:
        sp = sub.add_parser(s.replace("_", "-"), help=f"run the {s} stage (reads params.yaml; extra args go to "
                                                      f"stages/{s}.py, e.g. --variant)")
        sp.add_argument("--params", help="params file (default: params.yaml in the project root)")
    ft = sub.add_parser("fetch-text", help="download a hub text dataset to jsonl (online)")
    ft.add_argument("spec", help="hf:NAME[:CONFIG]:SPLIT")
    ft.add_argument("--out", required=True, help="jsonl file to write")
    ft.add_argument("--text-field", default="text")
    pr = sub.add_parser("preset", help="print `dvc exp run` -S flags for a preset file (configs/presets/*.yaml)")
    pr.add_argument("file")
    ck = sub.add_parser("check", help="validate every params.yaml section (types, bounds, choices, unknown keys)")
    ck.add_argument("--params", default="params.yaml")
    sub.add_parser("link-data", help="let `dvc exp run --temp/--queue` resolve a ../-relative data.dir "
                                     "(make repro runs it; every stage does it too)")
    ln = sub.add_parser("lineage", help="print which code, params and data produced a metric or run")
    ln.add_argument("what", help="a metric key (newest run that logged it) or an MLflow run id")
    ln.add_argument("--stage", help="only runs of this stage (e.g. evaluate@flexigpt)")
    gen = sub.add_parser("generate", help="greedy text generation from a saved model, optionally self-speculative "
                                          "(identical output, faster; stats on stderr)")
    gen.add_argument("--model", required=True, help="compact folder (artifacts/trained/flexigpt) or a HF folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--speculative", action="store_true",
                     help="draft with the replaced blocks skipped, verify with the full model")
    gen.add_argument("--draft-tokens", type=int, default=4, help="K: tokens drafted per round")
    gen.add_argument("--skip", help="comma-separated block positions the draft skips (a dense model's skip-draft, "
                                    "e.g. the plan's pruned blocks); default: the replaced positions")
    gen.add_argument("--temperature", type=float, help="not offered: only greedy decoding has the identical-output "
                                                      "guarantee")
    gen.add_argument("--do-sample", action="store_true", help="not offered (see --temperature)")
    rp = sub.add_parser("report", help="the study table of finished DVC experiments: mean ± std over seeds and "
                                       "FlexiGPT vs each baseline with paired bootstrap intervals and verdicts")
    rp.add_argument("--exp", action="append", help="an experiment to include (repeat; `workspace` too); "
                                                   "default: every finished one")
    rp.add_argument("--write", help="also write the table into this markdown file, between <!-- study:begin --> "
                                    "and <!-- study:end --> (appended when absent)")
    rp.add_argument("--readme", action="store_true", help="also write it into README.md the same way")
    rp.add_argument("--n-boot", type=int, default=10000, help="bootstrap replicates")
    sd = sub.add_parser("study", help="queue a declarative study (configs/studies/NAME.yaml) as DVC experiments")
    sd.add_argument("name", help="study name (seeds, budget, recipes, extend) or a .yaml path")
    sd.add_argument("--dry-run", action="store_true", help="only print the `dvc exp run --queue` commands")
    args, extra = ap.parse_known_args(argv)
    if extra and args.cmd.replace("-", "_") not in STAGES:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "fetch-text":
        _fetch_text(args)
    elif args.cmd == "preset":
        import shlex

        print(" ".join(shlex.quote(f) for f in preset_flags(args.file)))
    elif args.cmd == "lineage":
        _lineage(args)
    elif args.cmd == "check":
        _check(args.params)
    elif args.cmd == "link-data":
        _link_data()
    elif args.cmd == "generate":
        _generate(args)
    elif args.cmd == "report":
        _report(args)
    elif args.cmd == "study":
        _study(args)
    else:
        _run_stage(args.cmd.replace("-", "_"), args.params, extra)



if __name__ == "__main__":
    main()

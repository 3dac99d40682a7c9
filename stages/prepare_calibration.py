"""Stage prepare_calibration: text sources -> calibration / train / heldout token splits."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from pathlib import Path

from safetensors.torch import save_file

from flexigpt.config import data_dir
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_dir, write_json
from flexigpt.model_import import load_tokenizer_and_max_len
from flexigpt.packing import SplitSpec, build_splits
from flexigpt.stagekit import StageContext, log, stage_main
from flexigpt.textdata import read_source


def body(ctx: StageContext) -> None:
    p = ctx.params
    seq_len = p.int("calibration.seq_len", min=1)
    spec = SplitSpec(seq_len=seq_len,
                     n_calibration=p.int("calibration.n_sequences", min=1),
                     train_tokens=p.int("calibration.train_tokens", min=1),
                     n_heldout=p.int("heldout.n_sequences", min=1, allow_none=True),
                     seed=p.int("seed", min=0),
                     heldout_join=p.get("heldout.join", "\n\n"))
    if spec.train_tokens < seq_len:
        raise FlexiError("calibration.train_tokens", f"{spec.train_tokens} is less than one sequence ({seq_len})",
                         f"set it to at least calibration.seq_len = {seq_len}")
    tok, max_len = load_tokenizer_and_max_len(ctx.path("base_model"))
    if seq_len > max_len:
        raise FlexiError("calibration.seq_len", f"{seq_len} exceeds the model's maximum length {max_len}",
                         f"set it to at most {max_len}")
    ddir = data_dir(p)
    field = p.str("calibration.text_field", default="text")
    pool = read_source(p.get("calibration.source"), ddir, field, "calibration.source")
    same = p.get("heldout.source") == p.get("calibration.source")
    held = None if same else read_source(p.get("heldout.source"), ddir, p.str("heldout.text_field", default="text"),
                                         "heldout.source")
    log.info("packing %d documents into %d-token sequences (seed %d)", len(pool.docs), seq_len, spec.seed)
    splits, stats = build_splits(pool.docs, None if same else held.docs, tok, spec)
    keys = {"calibration": stats.pop("calibration_doc_keys"), "train": stats.pop("train_doc_keys")}
    manifest = {
        "seed": spec.seed, "seq_len": seq_len, "tokenizer": tok.name_or_path,
        "splits": {k: {"sequences": int(v.shape[0]), "tokens": int(v.numel()), "file": f"{k}.safetensors"}
                   for k, v in splits.items()},
        "sources": {"calibration": {"spec": pool.spec, "sha256": pool.files},
                    "heldout": {"spec": (pool if same else held).spec, "sha256": (pool if same else held).files}},
        "stats": stats,
    }
    with atomic_dir(ctx.path("data")) as tmp:
        for k, v in splits.items():
            save_file({"input_ids": v.contiguous()}, str(tmp / f"{k}.safetensors"), metadata={"seq_len": str(seq_len)})
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "doc_keys.json", keys)
    metrics = {f"{k}_tokens": v["tokens"] for k, v in manifest["splits"].items()}
    write_json(ctx.path("data_metrics"), metrics)
    ctx.run.log_metrics(metrics)
    ctx.run.log_artifact(ctx.path("data") / "manifest.json")
    files = {**pool.files, **((held.files if held else {}))}
    ctx.run.set_tags({f"data.sha256.{Path(f).parent.name}/{Path(f).name}": h for f, h in files.items()})
    log.info("splits: %s", {k: v["sequences"] for k, v in manifest["splits"].items()})


if __name__ == "__main__":
    stage_main("prepare_calibration", body)

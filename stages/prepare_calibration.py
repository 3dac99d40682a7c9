"""Stage prepare_calibration: text sources -> calibration / train / heldout token splits."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from pathlib import Path

from flexigpt.config import DataSettings, data_dir
from flexigpt.data.splits import CalibrationSettings, HeldoutSettings, prepare
from flexigpt.fileio import write_json
from flexigpt.model.importer import load_tokenizer_and_max_len
from flexigpt.pipeline.stagekit import StageContext, log, stage_main


def body(ctx: StageContext) -> None:
    p = ctx.params
    cal, held, seed = CalibrationSettings.from_params(p), HeldoutSettings.from_params(p), DataSettings.from_params(p).seed
    tok, max_len = load_tokenizer_and_max_len(ctx.path("base_model"))
    log.info("packing %s into %d-token sequences (seed %d)", cal.source, cal.seq_len, seed)
    manifest = prepare(cal, held, seed, data_dir(p), tok, max_len, ctx.path("data"))
    metrics = {f"{k}_tokens": v["tokens"] for k, v in manifest["splits"].items()}
    write_json(ctx.path("data_metrics"), metrics)
    ctx.run.log_metrics(metrics)
    ctx.run.log_artifact(ctx.path("data") / "manifest.json")
    files = {f: h for src in manifest["sources"].values() for f, h in src["sha256"].items()}
    ctx.run.set_tags({f"data.sha256.{Path(f).parent.name}/{Path(f).name}": h for f, h in files.items()})
    log.info("splits: %s", {k: v["sequences"] for k, v in manifest["splits"].items()})


if __name__ == "__main__":
    stage_main("prepare_calibration", body, outputs=("data", "data_metrics"))

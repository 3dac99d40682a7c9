"""Stage score_importance: base model + calibration split -> per-block importance (Eq. 1) + plots."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
import csv
import time

from safetensors.torch import load_file

from flexigpt import importance as imp
from flexigpt.arch import get_adapter
from flexigpt.devices import resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.forward import DTYPES
from flexigpt.fileio import atomic_dir, atomic_file, write_json
from flexigpt.model_import import load_plain
from flexigpt.plots import importance_bars
from flexigpt.stagekit import StageContext, log, stage_main


def load_calibration(ctx: StageContext, n_sequences: int | None):
    """The calibration token matrix [N, T] (first ``n_sequences`` rows when set)."""
    path = ctx.path("data") / "calibration.safetensors"
    if not path.is_file():
        raise FlexiError("paths.data", f"no calibration split at {path}",
                         "run the prepare_calibration stage first (`dvc repro prepare_calibration`)")
    tensors = load_file(str(path))
    if "input_ids" not in tensors:
        raise FlexiError("paths.data", f"{path} has no 'input_ids' tensor",
                         "re-run prepare_calibration (`dvc repro -f prepare_calibration`)")
    ids = imp.check_input_ids(tensors["input_ids"])
    if n_sequences is not None:
        if n_sequences > ids.shape[0]:
            raise FlexiError("importance.n_sequences", f"asks for {n_sequences} sequences but the calibration "
                             f"split has {ids.shape[0]}", f"set it to at most {ids.shape[0]}, or null for all")
        ids = ids[:n_sequences]
    return ids


def body(ctx: StageContext) -> None:
    p = ctx.params
    method = p.str("importance.method", choices=list(imp.METHODS))
    batch_size = p.int("importance.batch_size", min=1)
    dtype = resolve_dtype(p.str("importance.dtype", choices=["auto", *DTYPES], default="auto"))
    n_seq = p.int("importance.n_sequences", min=1, allow_none=True, default=None)
    ids = load_calibration(ctx, n_seq)  # validated before the model loads
    model, _ = load_plain(ctx.path("base_model"), "float32")
    log.info("scoring %d blocks with %s on %d x %d tokens (%s, batch %d)", get_adapter(model).num_blocks,
             method, ids.shape[0], ids.shape[1], dtype, batch_size)
    t0 = time.time()
    res = imp.score_blocks(model, ids, method=method, batch_size=batch_size, dtype=dtype)
    wall = time.time() - t0

    with atomic_dir(ctx.path("importance")) as tmp:
        write_json(tmp / "importance.json", res.to_dict())
    with atomic_file(ctx.path("importance_plot")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "score"])
        w.writerows([i, repr(s)] for i, s in enumerate(res.scores))
    importance_bars(res.scores, ctx.path("importance_png"), method=method)

    metrics = {"tokens": res.tokens, "sequences": res.sequences, "num_blocks": res.num_blocks,
               "score_min": min(res.scores), "score_max": max(res.scores)}
    ctx.timing.update(scoring_s=round(wall, 2), tokens_per_s=round(res.tokens / max(wall, 1e-9), 1))
    write_json(ctx.path("importance_metrics"), {"method": method, **metrics, "runtime": ctx.runtime(dtype)})
    ctx.run.log_metrics(metrics)
    for i, s in enumerate(res.scores):
        ctx.run.log_metrics({"importance_score": s}, step=i)
    ctx.run.log_artifact(ctx.path("importance") / "importance.json")
    ctx.run.log_artifact(ctx.path("importance_png"))
    ctx.run.set_tags({"importance.method": method, "importance.lowest": res.ranking()[:12]})
    log.info("lowest-scoring blocks: %s", res.ranking()[:12])


if __name__ == "__main__":
    stage_main("score_importance", body)

"""Stage import_model: model.source -> plain HF folder (safetensors) + metrics."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from flexigpt import model_import as mi
from flexigpt.fileio import atomic_dir, sha256_tree, write_json
from flexigpt.stagekit import StageContext, log, stage_main


def body(ctx: StageContext) -> None:
    p = ctx.params
    dtype = p.str("model.dtype", choices=list(mi.DTYPES))
    trust = p.bool("model.trust_remote_code", default=False)
    src = mi.resolve_source(p.get("model.source"))  # validates before any weights load
    log.info("importing %s (%s) as %s", src.spec, src.kind, dtype)
    model, tok = mi.load_source(src, dtype=dtype, trust_remote_code=trust)
    out = ctx.path("base_model")
    with atomic_dir(out) as tmp:
        mi.save_plain(model, tok, tmp)
        hashes = sha256_tree(tmp)
    weights = {k: v for k, v in hashes.items() if k.endswith(".safetensors")}
    metrics = {**mi.model_stats(model), "dtype": dtype, "source_kind": src.kind,
               "weights_sha256": weights, "source_sha256": mi.sha256_source(src), "runtime": ctx.runtime()}
    write_json(ctx.path("import_metrics"), metrics)
    ctx.run.log_metrics(metrics)
    ctx.run.set_tags({"weights_sha256": ",".join(weights.values()), "source": src.spec})
    log.info("imported: %s", {k: metrics[k] for k in ("params", "num_blocks", "hidden_size")})


if __name__ == "__main__":
    stage_main("import_model", body)

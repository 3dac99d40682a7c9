"""Stage import_model: model.source -> plain HF folder (safetensors) + metrics."""
import _env  # noqa: F401  (first: one clear line instead of a traceback outside the project's environment)
from flexigpt.fileio import write_json
from flexigpt.model.importer import ModelSettings, import_model
from flexigpt.pipeline.stagekit import StageContext, log, stage_main


def body(ctx: StageContext) -> None:
    s = ModelSettings.from_params(ctx.params)
    log.info("importing %s as %s", s.source, s.dtype)
    metrics = import_model(s, ctx.path("base_model"))
    write_json(ctx.path("import_metrics"), {**metrics, "runtime": ctx.runtime()})
    ctx.run.log_metrics(metrics)
    ctx.run.set_tags({"weights_sha256": ",".join(metrics["weights_sha256"].values()), "source": s.source})
    log.info("imported: %s", {k: metrics[k] for k in ("params", "num_blocks", "hidden_size")})


if __name__ == "__main__":
    stage_main("import_model", body, outputs=("base_model", "import_metrics"))

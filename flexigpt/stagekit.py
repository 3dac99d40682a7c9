"""Shared plumbing for the thin stage scripts in ``stages/``: params, logging, MLflow, errors.

A stage body receives a :class:`StageContext`; any :class:`FlexiError` it raises is printed as
one clear message (param, problem, fix) and the process exits with status 2, no traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Params
from .errors import FlexiError

log = logging.getLogger("flexigpt")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("FLEXIGPT_LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "urllib3", "filelock", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def experiment_name(source: str) -> str:
    """MLflow experiment named after the model: embedded name, or the folder/file stem."""
    return Path(str(source).rstrip("/")).name.removesuffix(".gguf") or "flexigpt"


@dataclass
class StageContext:
    stage: str
    params: Params
    run: object  # tracking.StageRun

    def path(self, key: str) -> Path:
        """An artifact path from params ``paths.<key>``."""
        return Path(self.params.get(f"paths.{key}"))


def is_main_process() -> bool:
    """False on the non-zero ranks of ``accelerate launch`` / torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def stage_main(stage: str, body: Callable[[StageContext], None]) -> None:
    """Run ``body`` inside an MLflow run (main process only); turn FlexiError into a clean exit(2)."""
    from . import tracking

    import signal

    stage = os.environ.get("DVC_STAGE") or stage  # DVC's own name (e.g. evaluate@flexigpt) when run by DVC
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated stage still marks its run FAILED
    setup_logging()
    t0 = time.time()
    try:
        params = Params.load(os.environ.get("FLEXIGPT_PARAMS", "params.yaml"))
        exp = experiment_name(params.get("model.source", "flexigpt"))
        runner = tracking.stage_run if is_main_process() else tracking.null_run
        with runner(stage, exp, params.data) as run:
            body(StageContext(stage, params, run))
            run.log_metrics({"stage_wall_s": time.time() - t0})
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    log.info("stage %s done in %.1f s", stage, time.time() - t0)

"""Shared plumbing for the thin stage scripts in ``stages/``: params, threads, logging, MLflow, errors.

A stage body receives a :class:`StageContext`; any :class:`FlexiError` it raises is printed as
one clear message (param, problem, fix) and the process exits with status 2, no traceback.

What a stage writes falls in two kinds, so that the same commit, params and data give the same bytes:
results (artifacts and metrics, hashed by DVC and read by later stages) and the *run record*
``<paths.timing>/<stage>.json`` (wall-clock figures, ``cache: false``, never a dependency).
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from flexigpt.config import Params, Settings, setting
from flexigpt.devices import ComputeSettings, apply_threads, resolve_device, resolve_threads, runtime_info
from flexigpt.errors import FlexiError
from flexigpt.fileio import check_replaceable, clean_stale_temps, write_json

log = logging.getLogger("flexigpt")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("FLEXIGPT_LOGLEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "urllib3", "filelock", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def experiment_name(source: str) -> str:
    """MLflow experiment named after the model: embedded name, or the folder/file stem."""
    return Path(str(source).rstrip("/")).name.removesuffix(".gguf") or "flexigpt"


@dataclass(frozen=True)
class PathSettings(Settings):
    """Where stages write, relative to the project root (params ``paths.*``)."""

    SECTION = "paths"
    base_model: str = setting("artifacts/base_model", "import_model: plain HF folder")
    import_metrics: str = setting("metrics/import_model.json", "import_model: metrics")
    data: str = setting("artifacts/data", "prepare_calibration: split files + manifest.json")
    data_metrics: str = setting("metrics/prepare_calibration.json", "prepare_calibration: metrics")
    importance: str = setting("artifacts/importance", "score_importance: importance.json")
    importance_metrics: str = setting("metrics/score_importance.json", "score_importance: metrics")
    importance_plot: str = setting("plots/importance.csv", "score_importance: DVC bar-plot data")
    importance_png: str = setting("plots/importance.png", "score_importance: bar chart")
    plan: str = setting("artifacts/plan", "prune: plan.json + distances.csv")
    prune_metrics: str = setting("metrics/prune.json", "prune: metrics")
    distance_plot: str = setting("plots/distances.csv", "prune: DVC heatmap data")
    distance_png: str = setting("plots/distances.png", "prune: distance heatmap")
    pruned_png: str = setting("plots/pruned_blocks.png", "prune: importance bars, pruned blocks marked")
    flexigpt_init: str = setting("artifacts/flexigpt_init", "svd_init: FlexiGPT at init, compact format")
    svd_init_metrics: str = setting("metrics/svd_init.json", "svd_init: metrics")
    trained: str = setting("artifacts/trained", "train_*: trained models, one compact folder per variant")
    checkpoints: str = setting("checkpoints", "train_*: resumable scratch checkpoints")
    metrics_dir: str = setting("metrics", "train_*/evaluate/compare: metrics json")
    plots_dir: str = setting("plots", "train_*/compare: DVC plots")
    eval: str = setting("artifacts/eval", "evaluate@*: lm-eval results per variant")
    reports: str = setting("reports", "compare: comparison.md / .csv")
    timing: str = setting("metrics/timing", "every stage: run record (wall-clock), never a dependency")
    outside_project: bool = setting(False, "allow output paths outside the project root (direct stage runs "
                                    "only: DVC refuses such outputs); an existing folder is still never replaced "
                                    "unless flexigpt wrote it")

    # folders a stage replaces whole; the rest are files (they have a suffix) or folders of files
    WHOLE_FOLDERS: ClassVar[tuple[str, ...]] = ("base_model", "data", "importance", "plan", "flexigpt_init")

    def check(self) -> None:
        # DVC refuses outputs outside the repo only after the command ran (and the writer replaced them)
        root = Path.cwd().resolve()
        for key, value in self.outputs().items():
            p = Path(value).expanduser()
            inside = (root / p).resolve().is_relative_to(root) and (root / p).resolve() != root
            if not inside and not (self.outside_project and (root / p).resolve() != root):
                raise FlexiError(f"paths.{key}", f"{value!r} is not a path inside the project ({root})",
                                 f"use a relative path below the project root, e.g. {getattr(type(self), key)}"
                                 + " (or set paths.outside_project: true for a direct stage run)")

    def outputs(self) -> dict[str, str]:
        """``{key: path}`` of every output path (the section minus its switches)."""
        return {k: v for k, v in self.to_dict().items() if k != "outside_project"}

    def check_outputs(self, outputs: tuple[str, ...]) -> None:
        """Before any work: none of a stage's ``outputs`` may replace what flexigpt did not write.

        An output is a key (``plan``, ``prune_metrics``) or a key and a sub-path (``trained/flexigpt``);
        one with a suffix is a file (it must not be an existing folder), else a folder written whole.
        """
        for out in outputs:
            key, _, sub = out.partition("/")
            path = Path(getattr(self, key)) / sub if sub else Path(getattr(self, key))
            kind = "file" if path.suffix else "dir"
            check_replaceable(path, kind=kind, param=f"paths.{key}")

    def scratch_parents(self) -> set[Path]:
        """Folders where a killed atomic writer can leave hidden temp siblings."""
        out = set()
        for key, value in self.outputs().items():
            p = Path(value)
            out.add(p.parent)
            if key not in self.WHOLE_FOLDERS and not p.suffix:
                out.add(p)  # folders of outputs (trained/<variant>, eval/<variant>, ...)
        return out


def clean_leftovers(paths: PathSettings) -> list[Path]:
    """Remove temp folders a killed stage left (``.<name>.tmp-*``, ``.<name>.old-*``); hold the stage lock."""
    gone = [q for parent in sorted(paths.scratch_parents()) for q in clean_stale_temps(parent)]
    if gone:
        log.info("removed %d temp file(s)/folder(s) a killed run left: %s", len(gone), ", ".join(map(str, gone[:3])))
    return gone


LOCK_FILE = Path(".flexigpt") / "stage.lock"


def stage_lock(stage: str):
    """Hold an exclusive lock on ``.flexigpt/stage.lock`` for this process's life; refuse if another stage holds it.

    DVC's own lock covers ``dvc repro``; this one also covers direct ``python stages/x.py`` runs and a
    stage orphaned by a killed ``dvc``. Returns the open file (the lock lives as long as it does)."""
    import fcntl

    LOCK_FILE.parent.mkdir(exist_ok=True)
    f = open(LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise FlexiError("stage", f"{holder} is running in this project ({LOCK_FILE} is locked)",
                         "wait for it to finish, or stop it first; two stages must not write the same outputs") from None
    f.seek(0)
    f.truncate()
    f.write(f"stage {stage} (pid {os.getpid()})\n")
    f.flush()
    return f


@dataclass
class StageContext:
    stage: str
    params: Params
    run: object  # tracking.StageRun
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    timing: dict[str, Any] = field(default_factory=dict)  # wall-clock figures: go to the run record only
    paths: PathSettings | None = None

    def path(self, key: str) -> Path:
        """An artifact path from params ``paths.<key>`` (the section is validated by :class:`PathSettings`)."""
        if self.paths is None:
            self.paths = PathSettings.from_params(self.params)
        return Path(getattr(self.paths, key))

    @property
    def device(self) -> str:
        """Where this stage computes (``compute.device`` resolved: cuda:N or cpu)."""
        return str(resolve_device(self.compute.device))

    def runtime(self, dtype: str | None = None) -> dict[str, Any]:
        """Device, resolved dtype, threads and hardware, for the stage's metrics and lineage (results depend on them)."""
        info = runtime_info(dtype, self.device)
        if self.run is not None:
            self.run.set_tags({f"runtime.{k}": v for k, v in info.items()})
        return info


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def is_main_process() -> bool:
    """False on the non-zero ranks of ``accelerate launch`` / torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def record_path(params: Params, stage: str) -> Path:
    """The stage's run record: ``<paths.timing>/<stage>.json`` (``evaluate@dense`` -> ``evaluate_dense``)."""
    return Path(params.get("paths.timing")) / f"{stage.replace('@', '_')}.json"


EXP_WORKSPACE_PARENTS = ("exps", "exps/standalone")
"""Where DVC puts experiment workspaces under ``.dvc/tmp``: ``--queue`` runs in ``exps/<tmp>/``,
``--temp`` in ``exps/standalone/<tmp>/`` (DVC 3)."""


def link_exp_data(params: Params, root: Path | None = None) -> list[Path]:
    """Make a project-relative ``data.dir`` such as ``../shared/data`` resolve in DVC's temp workspaces.

    ``dvc exp run --temp`` / ``--queue`` run a copy of the project in ``<root>/.dvc/tmp/exps/[standalone/]<tmp>/``,
    where ``../shared/data`` means ``<root>/.dvc/tmp/exps/[standalone/]shared/data``. A symlink there to
    ``<root>/../shared`` makes the same params (and the same DVC deps) name the same files. Absolute
    paths need nothing; other relative forms are left alone (use an absolute ``data.dir`` for them).
    Returns the links made.
    """
    root = (root or Path.cwd()).resolve()
    d = params.get("data.dir", None)
    if not isinstance(d, str) or not d or Path(d).is_absolute() or not (root / ".dvc").is_dir():
        return []
    parts = Path(os.path.normpath(d)).parts
    in_exp_workspace = any(root.parent.as_posix().endswith(f"/.dvc/tmp/{p}") for p in EXP_WORKSPACE_PARENTS)
    if len(parts) < 2 or parts[0] != ".." or parts[1] == ".." or in_exp_workspace:
        return []  # only ../X/...; and never from inside a temp workspace itself
    target, made = root.parent / parts[1], []
    if not target.exists():
        return []
    for parent in EXP_WORKSPACE_PARENTS:
        link = root / ".dvc" / "tmp" / parent / parts[1]
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            continue  # something real lives there: not ours to replace
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        made.append(link)
    return made


def stage_main(stage: str, body: Callable[[StageContext], None], outputs: tuple[str, ...] = ()) -> None:
    """Run ``body`` inside an MLflow run (main process only); turn FlexiError into a clean exit(2).

    ``stage`` is the DVC stage name (``evaluate@dense``, ``train_flexigpt``); it names the MLflow run
    and the run record. ``outputs`` are the paths it replaces (see :meth:`PathSettings.check_outputs`),
    checked before the body runs.
    """
    from flexigpt.track import tracking

    die_with_parent()  # killing dvc (or the launcher) stops the stage too: no orphan racing a second repro
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated stage still marks its run FAILED
    setup_logging()
    t0 = time.time()
    try:
        params = Params.load(os.environ.get("FLEXIGPT_PARAMS", "params.yaml"))
        compute = ComputeSettings.from_params(params)
        paths = PathSettings.from_params(params)  # a misspelt or outside-the-project path fails here
        if is_main_process():
            lock = stage_lock(stage)  # noqa: F841  (held until the process exits)
            paths.check_outputs(outputs)
            clean_leftovers(paths)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        apply_threads(resolve_threads(compute.threads, local))  # bits depend on it
        link_exp_data(params)
        exp = experiment_name(params.get("model.source", "flexigpt"))
        runner = tracking.stage_run if is_main_process() else tracking.null_run
        with runner(stage, exp, params.data) as run:
            ctx = StageContext(stage, params, run, compute, paths=paths)
            run.set_tags({f"runtime.{k}": v for k, v in runtime_info(None, ctx.device).items()})
            body(ctx)
            wall = time.time() - t0
            run.log_metrics({"stage_wall_s": wall, **ctx.timing})
            if is_main_process():
                write_json(record_path(params, stage), {"stage": stage, "stage_wall_s": round(wall, 3),
                                                        **ctx.timing, "runtime": runtime_info(None, ctx.device)})
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: disk full: {e.strerror} while writing {e.filename or 'an output'}; nothing was replaced "
              "(outputs are written to a temp folder first)\n  fix: free space on that disk and run the stage again",
              file=sys.stderr)
        sys.exit(2)
    log.info("stage %s done in %.1f s", stage, time.time() - t0)

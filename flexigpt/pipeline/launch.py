"""Run a training stage under ``accelerate launch`` and hand its exit status and message back unchanged.

``python -m accelerate.commands.launch ... script.py`` turns any non-zero exit of the script into
its own ``CalledProcessError`` (or torch elastic's ``ChildFailedError``) traceback with status 1,
burying the stage's one-line ``error: ...`` message and its status 2. So the stage script calls
:func:`relaunch` first: outside a launched process it starts accelerate's launcher in-process on
the same command line (config from params ``train_launch.config``), catches those two errors and
exits with the child's own status; inside a launched process (``LOCAL_RANK`` set) it returns.

The launcher and its children die with their parent (``PR_SET_PDEATHSIG``), so killing ``dvc``
never leaves a training run behind as an orphan that a second ``dvc repro`` would race with.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flexigpt.config import Params
from flexigpt.errors import FlexiError
from flexigpt.pipeline.stagekit import die_with_parent


LAUNCHED_ENV = "FLEXIGPT_LAUNCHED"  # set by relaunch: accelerate's single-process launcher sets no LOCAL_RANK


def launched() -> bool:
    """True inside a process started by ``accelerate launch`` / torchrun / :func:`relaunch`."""
    return any(k in os.environ for k in ("LOCAL_RANK", "ACCELERATE_USE_CPU")) or os.environ.get(LAUNCHED_ENV) == "1"


def _child_status(err: BaseException) -> int:
    if isinstance(err, subprocess.CalledProcessError):
        return err.returncode or 1
    failures = getattr(err, "failures", None) or {}  # torch.distributed.elastic ChildFailedError
    codes = [getattr(f, "exitcode", 1) for f in failures.values()]
    return next((c for c in codes if c and c > 0), 1)


def check_world(config: str | os.PathLike, devices: int | None = None) -> None:
    """Refuse an FSDP or MULTI_GPU Accelerate config whose ``num_processes`` exceeds the visible GPUs.

    Otherwise every launched process dies in its own traceback (FSDP without a GPU: "no available devices
    found"; more ranks than GPUs: an invalid device ordinal). MULTI_GPU on a machine with no GPU at all
    stays allowed: that is CPU DDP over gloo (``configs/accelerate_cpu_ddp.yaml``), the trainer's own choice.
    ``devices``: the GPU count (default ``torch.cuda.device_count()``).
    """
    import yaml

    try:
        cfg = yaml.safe_load(Path(config).read_text())
    except yaml.YAMLError as e:
        raise FlexiError("train_launch.config", f"{config} is not valid YAML ({e})", "fix its syntax") from None
    cfg = cfg if isinstance(cfg, dict) else {}
    kind, world = str(cfg.get("distributed_type", "NO")).upper(), cfg.get("num_processes")
    if kind not in ("FSDP", "MULTI_GPU") or cfg.get("use_cpu") or isinstance(world, bool) or not isinstance(world, int):
        return
    if kind == "FSDP" and world > 1:  # fail before launch, not as a hang on rank 0
        raise FlexiError("train_launch.config", f"{config} asks for FSDP with world size {world}; FSDP runs with one "
                         "process only for now (after training, rank 0 alone measures heldout PPL and saves the model, "
                         "which needs the full, unsharded weights)",
                         "set num_processes: 1, or use DDP (distributed_type: MULTI_GPU, one process per GPU): the "
                         "frozen base is replicated and only the adapters train")
    if devices is None:
        import torch

        devices = torch.cuda.device_count()
    if world <= devices or (kind == "MULTI_GPU" and devices == 0):
        return
    fix = (f"set num_processes: {devices} in {config} (one process per GPU)" if devices else
           "run it on a machine with GPUs, or point train_launch.config at configs/accelerate_single.yaml "
           "(one process) or configs/accelerate_cpu_ddp.yaml (CPU processes)")
    raise FlexiError("train_launch.config", f"{config} asks for {kind} with world size {world} (num_processes), "
                     f"but torch sees {devices} CUDA device(s)", fix)


def relaunch(argv: list[str] | None = None, params_path: str | None = None) -> None:
    """Re-run this script under ``accelerate launch`` unless already launched; exits with the child's status."""
    if launched():
        return
    from flexigpt.train import TrainLaunchSettings

    argv = list(sys.argv if argv is None else argv)
    try:
        params = Params.load(params_path or os.environ.get("FLEXIGPT_PARAMS", "params.yaml"))
        config = TrainLaunchSettings.from_params(params).config
        if not Path(config).is_file():
            raise FlexiError("train_launch.config", f"{config} does not exist",
                             "point it at one of configs/accelerate_*.yaml")
        check_world(config)  # before any process starts
    except FlexiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from accelerate.commands.launch import launch_command, launch_command_parser

    die_with_parent()
    os.environ[LAUNCHED_ENV] = "1"  # the children inherit it: they run the stage instead of relaunching
    args = launch_command_parser().parse_args(["--config_file", config, *argv])
    try:
        launch_command(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001  (the child already printed its own message)
        if isinstance(e, subprocess.CalledProcessError) or type(e).__name__ == "ChildFailedError":
            sys.exit(_child_status(e))
        raise
    sys.exit(0)

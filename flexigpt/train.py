"""Recovery / continued-pretraining trainer for every variant (FlexiGPT, ShortGPT+LoRA, extension).

Runs under ``accelerate launch`` with 1..N processes (DDP on CPU via gloo; FSDP on GPUs with
``configs/accelerate_fsdp.yaml``). Data order is a pure function of (seed, step), and each
process takes a fixed shard of every global batch, so a run is reproducible, resumable after
``kill -9`` and gives the same loss curve at any process count with equal global batch.

Loss: next-token cross-entropy, optionally + ``kd_weight · T² · KL(p_teacher^T ‖ p_student^T)``
against the dense teacher's logits.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flexigpt.model.arch import arch_of
from flexigpt.model.flexi import is_lora_param, is_output_norm_param, spec_of
from flexigpt.config import Settings, setting
from flexigpt.devices import resolve_device, resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_dir, is_ours

if TYPE_CHECKING:
    from flexigpt.data.splits import SplitRows

log = logging.getLogger(__name__)
OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Optimisation settings (params ``train.*``); the fields are the schema."""

    SECTION = "train"
    lr: float = setting(4e-3, "peak learning rate of adapters (paper: 4e-3)", min=0.0, min_exclusive=True)
    norm_lr_mult: float = setting(10.0, "lr multiplier for output-norm γ and pre-norms", min=0.0, min_exclusive=True)
    weight_decay: float = setting(0.0, "AdamW weight decay (adapters only)", min=0.0)
    optimizer: str = setting("adamw", "optimizer", choices=OPTIMIZERS)
    schedule: str = setting("cosine", "lr schedule after warmup", choices=SCHEDULES)
    warmup_steps: int = setting(2, "linear warmup, optimizer steps", min=0)
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of the peak", min=0.0, max=1.0)
    batch_size: int = setting(4, "global batch, sequences per optimizer step", min=1)
    micro_batch: int = setting(4, "sequences per forward pass per process", min=1)
    token_budget: int = setting(16384, "training tokens; steps = budget // (batch x seq_len)", min=1)
    grad_clip: float = setting(1.0, "max global grad norm (0 = off)", min=0.0)
    seed: int = setting(0, "training seed: batch order and random adapter init (not the data splits: data.seed)",
                        min=0)
    dtype: str = setting("auto", "autocast dtype", choices=("auto", "bfloat16", "float16", "float32"))
    train_prenorms: bool = setting(False, "also train replaced blocks' pre-norms")
    unfreeze_all: bool = setting(False, "train every parameter (full fine-tuning)")
    kd_weight: float = setting(0.0, "weight of the KL distillation term (0 = off)", min=0.0)
    kd_temperature: float = setting(1.0, "distillation temperature T", min=0.0, min_exclusive=True)
    checkpoint_every: int = setting(16, "steps between atomic checkpoints (0 = off)", min=0)
    resume: bool = setting(True, "continue from the scratch checkpoint after an interruption")


@dataclass(frozen=True)
class TrainLaunchSettings(Settings):
    """How the train stages are launched (params ``train_launch.*``, read by dvc.yaml's cmd)."""

    SECTION = "train_launch"
    config: str = setting("configs/accelerate_single.yaml", "accelerate config: single process, CPU DDP or FSDP")


def settings_from_params(p) -> TrainSettings:
    """Alias of :meth:`TrainSettings.from_params`."""
    return TrainSettings.from_params(p)


MAX_EPOCHS = 1000  # train.token_budget beyond this many passes over the split is refused


def validate(s: TrainSettings, n_train: int, seq_len: int, world: int = 1) -> int:
    """Check settings against the train split and process count; return the number of optimizer steps."""
    if s.batch_size % (s.micro_batch * world):
        raise FlexiError("train.batch_size", f"{s.batch_size} is not a multiple of micro_batch x processes "
                         f"({s.micro_batch} x {world})", "make batch_size divisible by micro_batch x num_processes")
    if s.batch_size > n_train:
        raise FlexiError("train.batch_size", f"{s.batch_size} sequences per step, but the train split has {n_train}",
                         f"lower it to at most {n_train}, or raise calibration.train_tokens")
    tokens_per_step = s.batch_size * seq_len
    if s.token_budget < tokens_per_step:
        raise FlexiError("train.token_budget", f"{s.token_budget} tokens is less than one batch "
                         f"({s.batch_size} x {seq_len} = {tokens_per_step})", f"set it to at least {tokens_per_step}")
    epochs = s.token_budget / (n_train * seq_len)
    if epochs > MAX_EPOCHS:
        raise FlexiError("train.token_budget", f"{s.token_budget:,} tokens is {epochs:,.0f} passes over the train split "
                         f"({n_train} x {seq_len} tokens); more than {MAX_EPOCHS} is a typo, not a schedule",
                         f"lower it to at most {MAX_EPOCHS * n_train * seq_len:,}, or raise calibration.train_tokens")
    return s.token_budget // tokens_per_step


# -- what trains -----------------------------------------------------------------------------------

def select_trainable(model: nn.Module, s: TrainSettings) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Freeze everything but adapters (+ γ, + replaced pre-norms if asked); return (arch, norm) params."""
    spec = spec_of(model)
    arch = arch_of(model)
    prenorm_ids: set[int] = set()
    if s.train_prenorms and spec is not None:
        prenorm_ids = {id(p) for pos in spec.replaced for n in arch.norms(pos).values() for p in n.parameters()}
    lora, norms = [], []
    for name, p in model.named_parameters():
        is_norm = is_output_norm_param(name) or id(p) in prenorm_ids
        train = s.unfreeze_all or is_lora_param(name) or is_norm
        p.requires_grad_(train)
        if train:
            (norms if is_norm or (s.unfreeze_all and p.ndim == 1) else lora).append((name, p))
    if not lora and not norms:
        raise FlexiError("adapters", "the model has nothing to train (no adapters, norms or unfrozen weights)",
                         "train a variant with adapters (flexigpt, lora_baseline) or set train.unfreeze_all")
    return lora, norms


def make_optimizer(lora, norms, s: TrainSettings) -> torch.optim.Optimizer:
    groups = [{"params": [p for _, p in lora], "lr": s.lr, "weight_decay": s.weight_decay},
              {"params": [p for _, p in norms], "lr": s.lr * s.norm_lr_mult, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, total: int, s: TrainSettings) -> float:
    """Linear warmup to 1, then cosine/linear decay to ``min_lr_ratio`` (or constant)."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.schedule == "constant" or total <= s.warmup_steps:
        return 1.0
    t = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if s.schedule == "cosine" else 1 - t
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * decay


# -- data order ------------------------------------------------------------------------------------

def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Global batch ``step``: rows of a per-epoch permutation seeded by (seed, epoch)."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[k * batch:(k + 1) * batch]


# -- losses ----------------------------------------------------------------------------------------

def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over tokens."""
    s = F.log_softmax(student[:, :-1].float() / T, -1).flatten(0, 1)
    t = F.log_softmax(teacher[:, :-1].float() / T, -1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * T * T


# -- checkpoints -----------------------------------------------------------------------------------

def spec_hash(model: nn.Module) -> str:
    spec = spec_of(model)
    blob = json.dumps(spec.to_dict() if spec is not None else {"dense": arch_of(model).num_blocks}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, state: dict) -> None:
    """Trainable tensors + AdamW moments (safetensors, no pickle) + JSON state, written atomically."""
    names = {id(p): n for n, p in named.items()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    moments[f"{names[id(p)]}::{k}"] = st[k].detach().contiguous().cpu()
            if "step" in st:
                state.setdefault("adam_step", {})[names[id(p)]] = float(st["step"])
    with atomic_dir(path) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in named.items()}, str(tmp / "trainable.safetensors"))
        save_file(moments or {"_empty": torch.zeros(1)}, str(tmp / "optimizer.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))


def settings_hash(s: TrainSettings, n_train: int, inputs: str = "") -> str:
    """Fingerprint of what a checkpoint's steps depend on: train settings, split size and ``inputs``
    (:func:`inputs_digest` of the train tokens and the start weights)."""
    keep = {k: v for k, v in asdict(s).items() if k not in ("checkpoint_every", "resume")}
    blob = json.dumps({**keep, "n_train": n_train, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


DIGEST_BLOCK_TOKENS = 1 << 22  # train tokens hashed per read: a lazy split is never read whole


def inputs_digest(model: nn.Module, train_ids: torch.Tensor | SplitRows, samples: int = 4096) -> str:
    """sha256 over the train tokens (all of them) and the start weights (every tensor's shape, dtype and
    ``samples`` evenly spaced values, trainable tensors in full).

    Why sampled: hashing every frozen weight costs minutes on a 70B model, on every rank; a rebuilt or
    different base model changes far more than a few values, and the trainable start (SVD init) in full
    depends on all of them. The tokens are hashed in row blocks: the same digest as hashing the whole
    int64 tensor at once (``load_split``'s), with one block in memory.
    """
    h = hashlib.sha256()
    rows = max(1, DIGEST_BLOCK_TOKENS // max(1, train_ids.shape[-1]))
    for a in range(0, len(train_ids), rows):
        h.update(train_ids[a:a + rows].detach().contiguous().cpu().numpy().tobytes())
    for name, p in model.named_parameters():
        t = p.detach().reshape(-1)
        if not p.requires_grad and t.numel() > samples:
            t = t[torch.arange(samples, device=t.device) * (t.numel() - 1) // (samples - 1)]  # exact integer steps
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(t.float().cpu().numpy().tobytes())
    return h.hexdigest()


def read_state(ckpt: Path | None) -> dict | None:
    """A checkpoint's state.json, or None when absent; unreadable -> None with a warning (start clean)."""
    if not ckpt or not (ckpt / "state.json").is_file():
        return None
    try:
        state = json.loads((ckpt / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
        return state
    except (ValueError, OSError) as e:
        log.warning("checkpoint %s has an unreadable state.json (%s); starting clean", ckpt, e)
        return None


def load_checkpoint(path: Path, named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, expect_hash: str) -> dict:
    state = json.loads((path / "state.json").read_text())
    if state.get("spec_hash") != expect_hash:
        raise FlexiError("train.resume", f"checkpoint {path} was written for a different plan/model "
                         f"({state.get('spec_hash')} != {expect_hash})",
                         f"delete {path} to start over, or set train.resume: false")
    tensors = load_file(str(path / "trainable.safetensors"))
    if set(tensors) != set(named):
        raise FlexiError("train.resume", f"checkpoint {path} holds other trainable tensors", f"delete {path}")
    moments = load_file(str(path / "optimizer.safetensors"))
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(tensors[n])
    for group in opt.param_groups:
        for p in group["params"]:
            n = next(k for k, v in named.items() if v is p)
            if f"{n}::exp_avg" in moments:
                opt.state[p] = {"step": torch.tensor(state["adam_step"][n]),
                                "exp_avg": moments[f"{n}::exp_avg"].to(p.device),
                                "exp_avg_sq": moments[f"{n}::exp_avg_sq"].to(p.device)}
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
    return state


# -- the loop --------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float
    wall_s: float
    tokens_per_s: float
    history: list[dict]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "history"}


def _mixed_precision(dtype: str, device: torch.device) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[resolve_dtype(dtype, device)]


def fsdp_wrap_policy(model: nn.Module) -> Callable | None:
    """FSDP auto-wrap policy: a unit per block that shares no tensor with another block (None: none shares).

    Why: FSDP puts a shared tensor in one unit's flat parameter only. A weight-shared block wrapped as its own
    unit then reads its source's resharded weights (2+ processes: size mismatch in forward), and at 1 process
    the saved state holds the shared tensors twice (``checkpoint.load`` refuses it). Blocks left unwrapped
    stay in the root unit, where FSDP handles shared parameters (``benchmarks/gpu_check.py``, part f).
    """
    import functools

    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = list(arch_of(model).blocks())
    owner: dict[int, int] = {}
    tied: set[int] = set()
    for i, block in enumerate(blocks):
        for p in block.parameters():
            j = owner.setdefault(id(p), i)
            if j != i:
                tied |= {i, j}
    if not tied:
        return None
    alone = {id(b) for i, b in enumerate(blocks) if i not in tied}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in alone)


def train(model: nn.Module, train_ids: torch.Tensor | SplitRows, s: TrainSettings, *, teacher: nn.Module | None = None,
          ckpt_dir: str | os.PathLike | None = None, resume: bool = True,
          on_step: Callable[[dict], None] | None = None, accelerator=None, device: str = "auto") -> TrainResult:
    """Train ``model``'s adapters (+norms) on ``train_ids`` [N, T] for ``s.token_budget`` tokens.

    ``train_ids`` is a tensor or a lazy :class:`~flexigpt.data.splits.SplitRows`: only rows indexed by a
    micro-batch are read."""
    from accelerate import Accelerator, DistributedType
    from tqdm.auto import tqdm

    dev = resolve_device(device)  # Accelerate places the model: the GPU of this rank, or the CPU
    acc = accelerator or Accelerator(mixed_precision=_mixed_precision(s.dtype, dev), cpu=dev.type == "cpu")
    world, rank = acc.num_processes, acc.process_index
    n, seq_len = train_ids.shape
    total = validate(s, n, seq_len, world)
    if total > n // s.batch_size and acc.is_main_process:  # once: repeated rows are not new data
        log.warning("train.token_budget %s needs %d steps, %.2f passes over the train split (%d sequences of %d "
                    "tokens, %d steps per pass), so batches repeat; raise calibration.train_tokens to at least %d "
                    "for distinct tokens", f"{s.token_budget:,}", total, total / (n // s.batch_size), n, seq_len,
                    n // s.batch_size, total * s.batch_size * seq_len)
    lora, norms = select_trainable(model, s)
    named = dict(lora + norms)
    opt = make_optimizer(lora, norms, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda st: lr_factor(st, total, s))
    start, history, tokens_seen = 0, [], 0
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    h, sh = spec_hash(model), settings_hash(s, n, inputs_digest(model, train_ids))
    prev = read_state(ckpt) if resume else None
    if prev is not None and prev.get("spec_hash") != h:
        raise FlexiError("train.resume", f"checkpoint {ckpt} was written for a different plan/model "
                         f"({prev.get('spec_hash')} != {h})", f"delete {ckpt} to start over, or set train.resume: false")
    if prev is not None and prev.get("settings_hash") != sh:
        log.warning("checkpoint %s was written with other train settings, data or start weights; starting fresh", ckpt)
        resume = False
    if ckpt and resume and prev is not None:
        st = load_checkpoint(ckpt, named, opt, h)
        start, history, tokens_seen = st["step"], st["history"], st["tokens_seen"]
        sched.load_state_dict(st["scheduler"])
        for g, lr in zip(opt.param_groups, sched.get_last_lr()):  # LambdaLR's load does not touch the optimizer
            g["lr"] = lr
        log.info("resumed from %s at step %d/%d", ckpt, start, total)
    model.train()
    raw_opt = opt
    if acc.distributed_type == DistributedType.FSDP and (policy := fsdp_wrap_policy(model)) is not None:
        acc.state.fsdp_plugin.auto_wrap_policy = policy  # instead of the config's one unit per block
    model, opt = acc.prepare(model, opt)
    if teacher is not None:
        teacher.eval().requires_grad_(False).to(acc.device)
    micro_per_rank = s.batch_size // (s.micro_batch * world)
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not acc.is_main_process)
    t_run = time.time()
    for step in bar:
        t0 = time.time()
        idx = batch_indices(step, s.batch_size, n, s.seed)
        mine = idx.view(world, -1)[rank]  # this process's fixed shard of the global batch
        loss_sum = torch.zeros((), device=acc.device)
        for m in range(micro_per_rank):
            ids = train_ids[mine[m * s.micro_batch:(m + 1) * s.micro_batch]].long().to(acc.device)
            ctx = acc.no_sync(model) if m < micro_per_rank - 1 else _null()
            with ctx, acc.autocast():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = lm_loss(logits, ids)
                if teacher is not None and s.kd_weight > 0:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=ids, use_cache=False).logits
                    loss = loss + s.kd_weight * kd_loss(logits, t_logits, s.kd_temperature)
                acc.backward(loss / micro_per_rank)
            loss_sum += loss.detach() / micro_per_rank
        loss_mean = acc.reduce(loss_sum, reduction="mean").item()
        if not math.isfinite(loss_mean):
            opt.zero_grad(set_to_none=True)
            last = f"the last good checkpoint (step {_ckpt_step(ckpt)}) is kept in {ckpt}" if ckpt else "no checkpoint"
            raise FlexiError("train.lr", f"loss became {loss_mean} at step {step}; {last}",
                             "lower train.lr or train.norm_lr_mult, keep train.grad_clip > 0, then rerun to resume")
        gnorm = acc.clip_grad_norm_([p for p in named.values()], s.grad_clip if s.grad_clip > 0 else float("inf"))
        lr_used = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(p).all()) for p in named.values()):  # the update itself can break the model
            last = f"the last good checkpoint (step {_ckpt_step(ckpt)}) is kept in {ckpt}" if ckpt else "no checkpoint"
            raise FlexiError("train.lr", f"the update at step {step + 1} made trainable weights NaN/inf; {last}",
                             "lower train.lr or train.norm_lr_mult, keep train.grad_clip > 0, then rerun to resume")
        tokens_seen += s.batch_size * seq_len
        dt = time.time() - t0
        rec = {"step": step + 1, "loss": loss_mean, "lr": lr_used, "grad_norm": float(gnorm),
               "tokens_per_s": s.batch_size * seq_len / dt, "tokens_seen": tokens_seen}
        history.append(rec)
        bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{rec['lr']:.2e}")
        if on_step and acc.is_main_process:
            on_step(rec)
        if ckpt and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and (step + 1) < total:
            if acc.is_main_process:
                save_checkpoint(ckpt, named, raw_opt, {"step": step + 1, "tokens_seen": tokens_seen, "history": history,
                                                   "scheduler": sched.state_dict(), "spec_hash": h,
                                                       "settings_hash": sh})
            acc.wait_for_everyone()
    wall = time.time() - t_run
    if ckpt and acc.is_main_process and (ckpt / "state.json").is_file() and is_ours(ckpt):
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)  # the finished model is the artifact; a stale checkpoint would mislead
    model = acc.unwrap_model(model)
    model.eval()
    done = total - start
    return TrainResult(total, tokens_seen, history[-1]["loss"] if history else float("nan"), wall,
                       done * s.batch_size * seq_len / max(wall, 1e-9), history)


@dataclass
class TrainOutput:
    """What the train stage writes: metrics (results), wall-clock figures (run record), the loss curve."""

    metrics: dict
    timing: dict
    history: list[dict]

    def curve_csv(self) -> str:
        cols = ("step", "loss", "lr", "grad_norm", "tokens_seen")  # no wall-clock column: the curve is a result
        rows = [",".join(cols)] + [",".join(repr(rec[k]) for k in cols) for rec in self.history]
        return "\n".join(rows) + "\n"


def train_variant(variant: str, r, s: TrainSettings, paths: dict[str, Path], *, device: str = "auto",
                  on_step: Callable[[dict], None] | None = None) -> TrainOutput:
    """The train step: check, load the variant's start, train, measure heldout PPL, save it compact.

    ``r`` is the :class:`~flexigpt.variants.Recipe`; ``paths`` holds ``base_model``, ``plan``,
    ``flexigpt_init``, ``data``, ``trained`` and ``checkpoints``. Every check runs before weights load.
    On the non-main processes of a launch it returns after training, with empty metrics.
    """
    from flexigpt import variants
    from flexigpt.data.splits import load_split, open_split
    from flexigpt.model import checkpoint
    from flexigpt.model.forward import mean_nll

    variants.check_training(variant, r, paths["base_model"], paths["plan"])
    ids = open_split(paths["data"], "train")  # lazy: read a micro-batch at a time, never the whole split
    validate(s, ids.shape[0], ids.shape[1], int(os.environ.get("WORLD_SIZE", "1")))  # before any weights load
    model, base, tok = variants.training_start(variant, r, paths["base_model"], paths["plan"], paths["flexigpt_init"])
    teacher = base if s.kd_weight > 0 else None
    del base
    res = train(model, ids, s, teacher=teacher, ckpt_dir=Path(paths["checkpoints"]) / variant, resume=s.resume,
                on_step=on_step, device=device)
    if int(os.environ.get("RANK", "0")) != 0:
        return TrainOutput({}, {}, res.history)
    dtype = resolve_dtype(s.dtype, device)
    heldout = load_split(paths["data"], "heldout")
    ppl = math.exp(mean_nll(model, heldout, batch_size=s.micro_batch, progress=True,
                            dtype="float32" if dtype == "float16" else dtype))  # fp16 trains; PPL is not taken in it
    checkpoint.save(model.to("cpu"), Path(paths["trained"]) / variant, tokenizer=tok)
    result = res.to_dict()
    timing = {"train_s": round(result.pop("wall_s"), 2), "tokens_per_s": round(result.pop("tokens_per_s"), 1)}
    metrics = {**result, "heldout_ppl": ppl, "variant": variant, "mode": r.mode, "seed": s.seed,
               "trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad)}
    return TrainOutput(metrics, timing, res.history)


def _ckpt_step(ckpt: Path | None) -> int | None:
    state = read_state(ckpt)
    return state["step"] if state else None


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False

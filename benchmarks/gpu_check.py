"""Does the paper-scale path work on one GPU, and how fast? Random LLaMA-2-7B-shaped weights, nothing downloaded.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu.json   # one GPU (sized for an H200, < 10 min)
    python benchmarks/gpu_check.py --tiny --json /tmp/gpu_tiny.json      # the same code at tiny shapes, on the CPU

Models are built from a ``LlamaConfig`` (32 blocks, hidden 4096, intermediate 11008, 32 heads, vocab
32000) with random weights, through the project's own code (``variants.build_variant``,
``checkpoint.merge``, ``serve.speculative.generate``, ``train.train``). Parts, each with its peak GPU
memory (``torch.cuda.max_memory_allocated``, reset between parts):

a. BI scoring (``score_blocks``, block_influence) vs a plain backbone forward on the same batches, in
   memory and layer-streamed from a saved, sharded copy (``StreamedModel``, as the score_importance
   stage runs: one block in GPU memory at a time);
b. base selection for 10 pruned x 22 kept blocks at r = 256 in float32 (``make_plan``), seconds;
c. a FlexiGPT train step vs a dense PEFT-LoRA step (the unpruned model, LoRA on the same linears of
   every block), rank 256, bf16;
d. forward of FlexiGPT merged (``checkpoint.merge``) vs the dense model;
e. greedy decode of the merged model, plain vs self-speculative: tokens/s, and identical outputs;
f. ``accelerate launch`` with ``configs/accelerate_fsdp.yaml``, world size 1: a few FlexiGPT training
   steps on the same random model (saved to a temp folder first), saved compact as the train stage
   saves it, then loaded back here: it must load, store each shared (tied) base tensor once and hold
   the frozen base weights unchanged. Without a GPU accelerate cannot run FSDP (``FSDP_ON_CPU``), so
   the same worker then runs under ``configs/accelerate_cpu_ddp.yaml`` with 1 process, and says so.

Speed is always a ratio of medians, timed side by side in one process with interleaved repeats
(:func:`flexigpt.serve.speed.interleaved`), CUDA synchronised inside every timed call. Targets
(met/missed; meaningful on a GPU only): BI scoring >= 0.9 x plain forward throughput; base selection
< 60 s; FlexiGPT train step <= 1.10 x the dense PEFT-LoRA step.

At 7B scale the adapters start from ``init: zeros`` (``--init`` to change): svd_diff takes 70 full
SVDs of 4096-wide matrices, minutes that are not what this script measures; ``--tiny`` uses svd_diff.
Decoding runs in float32 (``--decode-dtype``): speculative output equals plain greedy output up to
rounding, and bf16 makes near-tied logits of a random model likely enough to flip a token.

Imports only torch, transformers, peft, accelerate, safetensors and flexigpt (no dvc, mlflow, lm-eval,
datasets). Exit status 1 when any part fails (an exception, non-finite scores or losses, speculative
output not identical, a saved model that does not load or lost its shared blocks); targets never fail it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout, installed or not

from flexigpt import variants  # noqa: E402
from flexigpt.compress.distance import truncated_svd  # noqa: E402
from flexigpt.compress.importance import score_blocks  # noqa: E402
from flexigpt.compress.plan import Plan, PruneSettings, make_plan  # noqa: E402
from flexigpt.model import checkpoint  # noqa: E402
from flexigpt.model import flexi as fm  # noqa: E402
from flexigpt.model.arch import arch_of  # noqa: E402
from flexigpt.model.forward import compute_context, iter_batches, mean_nll  # noqa: E402
from flexigpt.serve.speculative import generate  # noqa: E402
from flexigpt.serve.speed import interleaved  # noqa: E402
from flexigpt.train import TrainSettings, lm_loss, make_optimizer, select_trainable, train  # noqa: E402

FSDP_CONFIG = ROOT / "configs" / "accelerate_fsdp.yaml"
CPU_CONFIG = ROOT / "configs" / "accelerate_cpu_ddp.yaml"
FSDP_ON_CPU = ("FSDP not exercised on CPU: accelerate's FSDP plugin needs an accelerator device (with "
               "fsdp_sync_module_states: true it stops with 'There are currently no available devices found'), and "
               "without a GPU flexigpt's trainer asks for Accelerator(cpu=True), which selects plain CPU processes, not "
               "FSDP; the same worker ran under configs/accelerate_cpu_ddp.yaml with 1 process instead")
TARGETS = {  # part -> (JSON key, comparison, bound, description)
    "bi_scoring": ("bi_vs_forward", ">=", 0.9, "BI scoring >= 0.9 x plain forward throughput"),
    "base_selection": ("seconds", "<", 60.0, "base selection at r=256 (7B shape) < 60 s"),
    "train_step": ("flexigpt_vs_dense_lora", "<=", 1.10, "FlexiGPT train step <= 1.10 x dense PEFT-LoRA step"),
}
PARTS = {"a": "bi_scoring", "b": "base_selection", "c": "train_step", "d": "merged_forward", "e": "decode",
         "f": "fsdp"}


@dataclass(frozen=True)
class Shape:
    """Model and workload sizes of one run: ``FULL`` is LLaMA-2-7B, ``TINY`` the same code on a CPU."""

    blocks: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    pruned: tuple[int, ...]   # FULL: 10 deep blocks of 32; with random weights any fixed set serves
    rank: int                 # LoRA rank and base-selection rank r
    seq_len: int
    score_seqs: int           # BI scoring: sequences, scored score_batch at a time
    score_batch: int
    train_batch: int          # sequences per train step
    forward_batch: int        # sequences per merged/dense forward
    prompt_tokens: int
    new_tokens: int
    draft_tokens: int         # K of self-speculative decoding
    fsdp_steps: int
    fsdp_batch: int
    fsdp_micro: int
    fsdp_seq: int
    repeats: int
    init: str                 # adapter init of the FlexiGPT models (see module docstring)


FULL = Shape(blocks=32, hidden=4096, intermediate=11008, heads=32, vocab=32000, pruned=tuple(range(21, 31)),
             rank=256, seq_len=2048, score_seqs=16, score_batch=8, train_batch=2, forward_batch=4, prompt_tokens=64,
             new_tokens=64, draft_tokens=3, fsdp_steps=3, fsdp_batch=2, fsdp_micro=1, fsdp_seq=1024, repeats=5,
             init="zeros")
TINY = Shape(blocks=8, hidden=64, intermediate=172, heads=4, vocab=256, pruned=(4, 5, 6), rank=4, seq_len=64,
             score_seqs=8, score_batch=4, train_batch=2, forward_batch=2, prompt_tokens=16, new_tokens=16,
             draft_tokens=3, fsdp_steps=3, fsdp_batch=4, fsdp_micro=2, fsdp_seq=32, repeats=3, init="svd_diff")


# -- helpers ------------------------------------------------------------------------------------

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device) -> Callable[[], float]:
    """``fn`` as a job for :func:`interleaved`: seconds of one call, CUDA synchronised before and after."""
    def job() -> float:
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        return time.perf_counter() - t0
    return job


def side_by_side(jobs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per job: one untimed warm-up each, then ``repeats`` interleaved rounds."""
    for job in jobs.values():
        job()
    return interleaved(jobs, repeats)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def tokens(shape: Shape, n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (n, t), generator=g)


def finite(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def random_llama(shape: Shape, dev: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A LLaMA-2-shaped causal LM with random weights, allocated directly on ``dev``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.blocks, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(dev):  # a 7B model initialised on the CPU first would take minutes
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def recipe(shape: Shape, init: str) -> variants.Recipe:
    return variants.Recipe(adapters=variants.AdapterSettings(rank=shape.rank, init=init))


# -- parts a-e: one process, side by side -------------------------------------------------------------

def part_bi_scoring(base, shape: Shape, dev: torch.device) -> dict:
    """In-memory BI scoring and layer-streamed BI scoring (blocks read one at a time from a saved copy,
    as the score_importance stage runs), each against a plain backbone forward, interleaved."""
    from flexigpt.model.stream import StreamedModel

    ids = tokens(shape, shape.score_seqs, shape.seq_len, seed=1).to(dev)
    body = arch_of(base).backbone()
    box: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_stream_") as folder:
        t0 = time.perf_counter()
        base.save_pretrained(folder, max_shard_size="2GB")  # sharded, as hub checkpoints are
        save_s = time.perf_counter() - t0
        streamed = StreamedModel(folder, device=dev)

        def plain() -> None:
            with torch.inference_mode(), compute_context("bfloat16", base):
                for batch in iter_batches(ids, shape.score_batch):
                    body(input_ids=batch, use_cache=False)

        def score() -> None:
            box["res"] = score_blocks(base, ids, method="block_influence", batch_size=shape.score_batch,
                                      dtype="bfloat16", progress=False)

        def score_streamed() -> None:
            box["streamed"] = score_blocks(streamed, ids.cpu(), method="block_influence",
                                           batch_size=shape.score_batch, dtype="bfloat16", progress=False)

        med = side_by_side({"plain_forward": timed(plain, dev), "bi_score": timed(score, dev),
                            "bi_streamed": timed(score_streamed, dev)}, shape.repeats)
        est = streamed.memory_estimate(ids.numel(), shape.score_batch * shape.seq_len)
    scores, streamed_scores = box["res"].scores, box["streamed"].scores
    n = ids.numel()
    out = {"tokens": n, "bi_s": med["bi_score"], "forward_s": med["plain_forward"], "streamed_s": med["bi_streamed"],
           "bi_tokens_per_s": n / med["bi_score"], "forward_tokens_per_s": n / med["plain_forward"],
           "bi_vs_forward": med["plain_forward"] / med["bi_score"],
           "streamed_vs_forward": med["plain_forward"] / med["bi_streamed"], "save_s": save_s,
           "streamed_memory_estimate_gib": sum(est.values()) / 2 ** 30,
           # the saved copy is read as float32 weights (norms then run in float32): close, not bit-equal
           "streamed_max_abs_diff": max(abs(a - b) for a, b in zip(scores, streamed_scores)),
           "streamed_same_ranking": box["res"].ranking() == box["streamed"].ranking(),
           "scores": scores, "scores_finite": len(scores) == shape.blocks and finite(*scores, *streamed_scores)}
    out["ok"] = out["scores_finite"]
    return out


def part_base_selection(base, shape: Shape, dev: torch.device) -> tuple[dict, Plan]:
    w = arch_of(base).weights(0)["self_attn.q_proj"]
    truncated_svd(w, shape.rank, "gram", torch.float32)  # warm-up: cuSOLVER/cuBLAS handles, not part of the time
    sync(dev)
    s = PruneSettings(ratio=None, blocks=list(shape.pruned), rank=shape.rank, precision="float32")
    t0 = time.perf_counter()
    plan = make_plan(base, None, s, progress=False)
    sync(dev)
    secs = time.perf_counter() - t0
    dists = [d for row in plan.distances.values() for d in row.values()]
    out = {"seconds": secs, "rank": shape.rank, "precision": "float32", "pruned": plan.pruned, "kept": plan.kept,
           "base": {str(i): j for i, j in plan.base.items()}, "distances_finite": finite(*dists)}
    out["ok"] = out["distances_finite"] and len(plan.pruned) == len(shape.pruned)
    return out, plan


def fallback_plan(base, shape: Shape) -> Plan:
    """Nearest-kept-neighbour bases, so parts c-f still run when base selection failed."""
    return make_plan(base, None, PruneSettings(ratio=None, blocks=list(shape.pruned), metric="nearest"),
                     progress=False)


def build_flexi(base, plan: Plan, shape: Shape, dev: torch.device, init: str) -> torch.nn.Module:
    with torch.device(dev):
        return variants.build_variant(base, "flexigpt", recipe(shape, init), plan).eval()


def part_train_step(base, plan: Plan, shape: Shape, dev: torch.device, init: str) -> tuple[dict, torch.nn.Module]:
    t0 = time.perf_counter()
    with torch.device(dev):  # PEFT creates the adapters where they will run, not on the CPU first
        flexi = variants.build_variant(base, "flexigpt", recipe(shape, init), plan)
        sync(dev)
        build_s = time.perf_counter() - t0
        torch.manual_seed(0)  # PEFT draws the zero-init adapters' A from the global generator
        lora = fm.LoraSettings(rank=shape.rank, targets=["all"])
        dense = fm.build(copy.deepcopy(base), fm.shortgpt_spec(shape.blocks, [], lora))  # nothing pruned: LoRA everywhere
    ids = tokens(shape, shape.train_batch, shape.seq_len, seed=2).to(dev)
    s = TrainSettings()
    losses: dict[str, float] = {}

    def stepper(name: str, model) -> Callable[[], None]:
        adapters, norms = select_trainable(model, s)
        opt = make_optimizer(adapters, norms, s)
        model.train()

        def step() -> None:
            with compute_context("bfloat16", model):
                loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name] = loss.item()
        return step

    start = {n: p.detach().clone() for n, p in flexi.named_parameters() if fm.is_adapter_param(n)}
    med = side_by_side({"flexigpt": timed(stepper("flexigpt", flexi), dev),
                        "dense_lora": timed(stepper("dense_lora", dense), dev)}, shape.repeats)
    with torch.no_grad():  # parts d-e serve FlexiGPT as built, not after the timed steps moved its γ and LoRA
        for n, p in flexi.named_parameters():
            if n in start:
                p.copy_(start[n])
    n = ids.numel()
    out = {"tokens": n, "rank": shape.rank, "init": init, "flexigpt_build_s": build_s,
           "flexigpt_step_s": med["flexigpt"], "dense_lora_step_s": med["dense_lora"],
           "flexigpt_tokens_per_s": n / med["flexigpt"], "dense_lora_tokens_per_s": n / med["dense_lora"],
           "flexigpt_vs_dense_lora": med["flexigpt"] / med["dense_lora"],
           "flexigpt_trainable": sum(p.numel() for p in flexi.parameters() if p.requires_grad),
           "dense_lora_trainable": sum(p.numel() for p in dense.parameters() if p.requires_grad),
           "losses": losses, "losses_finite": finite(*losses.values())}
    out["ok"] = out["losses_finite"]
    del dense
    flexi.eval().requires_grad_(False)
    return out, flexi


def part_merged_forward(base, flexi, shape: Shape, dev: torch.device) -> tuple[dict, torch.nn.Module]:
    with torch.device(dev):  # merge() builds its skeleton with from_config: allocate it where it will run
        merged = checkpoint.merge(flexi)
    ids = tokens(shape, shape.forward_batch, shape.seq_len, seed=3).to(dev)

    def forward(model) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), compute_context("bfloat16", model):
                model(input_ids=ids, use_cache=False)
        return run

    med = side_by_side({"dense": timed(forward(base), dev), "merged": timed(forward(merged), dev)}, shape.repeats)
    n = ids.numel()
    out = {"tokens": n, "merged_s": med["merged"], "dense_s": med["dense"], "merged_tokens_per_s": n / med["merged"],
           "dense_tokens_per_s": n / med["dense"], "merged_vs_dense": med["merged"] / med["dense"],
           "merged_lora_positions": fm.spec_of(merged).lora_positions}
    out["ok"] = finite(out["merged_vs_dense"])
    return out, merged


def part_decode(merged, shape: Shape, dev: torch.device, dtype: str) -> dict:
    model = merged.to(getattr(torch, dtype))
    prompt = tokens(shape, 1, shape.prompt_tokens, seed=4).to(dev)
    n, k = shape.new_tokens, shape.draft_tokens
    reference, _ = generate(model, prompt, n, eos_token_id=None)
    seen: dict[str, Any] = {"identical": True}

    def plain() -> None:
        generate(model, prompt, n, eos_token_id=None)

    def speculative() -> None:
        out, stats = generate(model, prompt, n, speculative=True, draft_tokens=k, eos_token_id=None)
        seen["identical"] = seen["identical"] and torch.equal(out, reference)
        seen["stats"] = stats

    med = side_by_side({"plain": timed(plain, dev), "speculative": timed(speculative, dev)}, shape.repeats)
    st = seen["stats"]
    out = {"dtype": dtype, "prompt_tokens": shape.prompt_tokens, "new_tokens": n, "draft_tokens": k,
           "plain_s": med["plain"], "speculative_s": med["speculative"], "plain_tokens_per_s": n / med["plain"],
           "speculative_tokens_per_s": n / med["speculative"], "speculative_speedup": med["plain"] / med["speculative"],
           "identical": bool(seen["identical"]), "acceptance_rate": st.acceptance_rate,
           "tokens_per_round": st.tokens_per_round, "skipped": st.skipped}
    out["ok"] = out["identical"]
    return out


# -- part f: accelerate launch (FSDP on a GPU) -----------------------------------------------------------

@dataclass(frozen=True)
class FsdpJob:
    """What the worker builds and trains; written to ``job.json`` beside the saved base model and plan."""

    vocab: int
    rank: int
    init: str
    steps: int
    batch: int
    micro: int
    seq: int
    dtype: str          # trainer autocast dtype (train.dtype)
    weights: str        # dtype of the saved base weights


def fsdp_tokens(job: FsdpJob) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, job.vocab, (2 * job.batch, job.seq), generator=g)


def fsdp_worker(workdir: Path) -> None:
    """One process of ``accelerate launch``: FlexiGPT from the saved base and plan, trained and saved as the
    train stage does it (``train.train``, then ``checkpoint.save(model.to("cpu"))`` on rank 0)."""
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    job = FsdpJob(**json.loads((workdir / "job.json").read_text()))
    base = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=getattr(torch, job.weights))
    r = variants.Recipe(adapters=variants.AdapterSettings(rank=job.rank, init=job.init))
    model = variants.build_variant(base, "flexigpt", r, Plan.load(workdir / "plan.json"), copy_base=False)
    before = {n: float(p.detach().double().abs().sum()) for n, p in model.named_parameters() if fm.is_adapter_param(n)}
    ids = fsdp_tokens(job)
    s = TrainSettings(lr=4e-3, warmup_steps=1, batch_size=job.batch, micro_batch=job.micro,
                      token_budget=job.steps * job.batch * job.seq, dtype=job.dtype, checkpoint_every=0, resume=False)
    res = train(model, ids, s)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    arch, spec = arch_of(model), fm.spec_of(model)
    shared = [(p, spec.sources[p]) for p in spec.replaced if spec.sources[p] != p]
    after = {n: float(p.detach().double().abs().sum()) for n, p in model.named_parameters() if fm.is_adapter_param(n)}
    result = {"distributed_type": str(AcceleratorState().distributed_type).rsplit(".", 1)[-1],
              "world_size": int(os.environ.get("WORLD_SIZE", "1")),
              "fsdp_units": sum(isinstance(m, FSDP) for m in model.modules()),
              "losses": [h["loss"] for h in res.history], "final_loss": res.final_loss,
              "ties_in_memory": all(arch.weights(p)[n].data_ptr() == arch.weights(s_)[n].data_ptr()
                                    for p, s_ in shared for n in arch.linear_names),
              "adapters_changed": sum(before[n] != after[n] for n in before), "adapters": len(before),
              "nll_trained": mean_nll(model, ids[:2], batch_size=1, dtype=job.dtype),
              "worker_peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    checkpoint.save(model.to("cpu"), workdir / "out")
    (workdir / "result.json").write_text(json.dumps(result, indent=1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def original_tensor(folder: Path, key: str) -> torch.Tensor:
    """Tensor ``key`` of a saved HF folder (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(folder / name), framework="pt") as f:
        return f.get_tensor(key)


def check_saved(workdir: Path, job: FsdpJob, dev: torch.device) -> dict:
    """Load the worker's compact output: shared tensors stored once, frozen base unchanged, same NLL."""
    out = workdir / "out"
    with torch.device(dev):  # the skeleton is built where it runs; the tensors are read on the CPU
        loaded = checkpoint.load(out)  # checksums, and every stored name against the layer map
    arch, spec = arch_of(loaded), fm.spec_of(loaded)
    shared = [(p, spec.sources[p]) for p in spec.replaced if spec.sources[p] != p]
    with safe_open(str(out / "base.safetensors"), framework="pt") as f:
        stored = list(f.keys())
    sharing: dict[tuple[int, str], list[int]] = {}  # (source block, linear) -> every position running it
    for p, s in shared:
        for n in arch.linear_names:
            sharing.setdefault((s, n), [s]).append(p)
    copies = {f"{s}.{n}": sum(any(k.startswith(f"{arch.blocks_path}.{q}.{n}.") for k in stored) for q in qs)
              for (s, n), qs in sharing.items()}  # stored under the first position's name, once
    changed = [f"{s}.{n}" for s in sorted({s for _, s in shared}) for n, w in arch.weights(s).items()
               if not torch.equal(original_tensor(workdir / "base", f"{arch.blocks_path}.{s}.{n}.weight").float(),
                                  w.detach().float().cpu())]
    nll = mean_nll(loaded.to(dev), fsdp_tokens(job)[:2], batch_size=1, dtype=job.dtype)
    return {"loads": True, "shared_positions": [p for p, _ in shared],
            "shared_not_stored_once": sorted(k for k, c in copies.items() if c != 1),
            "ties_loaded": all(arch.weights(p)[n] is arch.weights(s)[n] for p, s in shared for n in arch.linear_names),
            "frozen_base_changed": changed, "nll_loaded": nll,
            "stored_dtype": str(next(iter(loaded.parameters())).dtype).replace("torch.", "")}


def part_fsdp(base, plan: Plan, shape: Shape, dev: torch.device, init: str, workdir: Path) -> dict:
    on_gpu = dev.type == "cuda"
    job = FsdpJob(vocab=shape.vocab, rank=shape.rank, init=init, steps=shape.fsdp_steps, batch=shape.fsdp_batch,
                  micro=shape.fsdp_micro, seq=shape.fsdp_seq, dtype="bfloat16" if on_gpu else "float32",
                  weights=str(next(base.parameters()).dtype).replace("torch.", ""))
    base.save_pretrained(workdir / "base", safe_serialization=True)
    plan.save(workdir / "plan.json")
    (workdir / "job.json").write_text(json.dumps(asdict(job)))
    config = FSDP_CONFIG if on_gpu else CPU_CONFIG
    if not on_gpu:
        print(f"note: {FSDP_ON_CPU}", flush=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
           "--main_process_port", str(free_port()), str(Path(__file__).resolve()), "--fsdp-worker", str(workdir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    out: dict[str, Any] = {"config": str(config.relative_to(ROOT)), "fsdp_exercised": False, "seconds": secs,
                           "steps": job.steps, "tokens_per_step": job.batch * job.seq}
    if not on_gpu:
        out["note"] = FSDP_ON_CPU
    if res.returncode != 0 or not (workdir / "result.json").is_file():
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
        out.update(ok=False, error=f"worker exited {res.returncode}:\n{tail}")
        return out
    out.update(json.loads((workdir / "result.json").read_text()))
    out["fsdp_exercised"] = out["distributed_type"] == "FSDP"
    out.update(check_saved(workdir, job, dev))
    tol = 2e-2 if job.dtype == "bfloat16" else 1e-4
    out["nll_matches"] = abs(out["nll_loaded"] - out["nll_trained"]) <= tol * abs(out["nll_trained"])
    out["ok"] = (finite(*out["losses"], out["nll_trained"], out["nll_loaded"]) and out["ties_in_memory"]
                 and out["ties_loaded"] and not out["shared_not_stored_once"] and not out["frozen_base_changed"]
                 and out["adapters_changed"] > 0 and out["nll_matches"] and out["fsdp_exercised"] == on_gpu)
    return out


# -- the run ---------------------------------------------------------------------------------------------

def run_part(results: dict, name: str, dev: torch.device, fn: Callable[[], Any]) -> Any:
    """Run one part: its dict (+ peak GPU memory and wall time) goes to ``results``; an exception fails it."""
    free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    print(f"[{name}] ...", flush=True)
    t0 = time.perf_counter()
    extra = None
    try:
        got = fn()
        out, extra = got if isinstance(got, tuple) else (got, None)
    except Exception as e:  # noqa: BLE001  (a failed part is reported, the others still run)
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out["wall_s"] = time.perf_counter() - t0
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    results["parts"][name] = out
    print(f"[{name}] {'ok' if out['ok'] else 'FAILED'} in {out['wall_s']:.1f} s", flush=True)
    return extra


def not_run(results: dict, letters: str, why: str) -> None:
    for letter in letters:
        results["parts"][PARTS[letter]] = {"ok": False, "error": f"not run: {why}"}


def judge(results: dict) -> None:
    """Targets met/missed (recorded on every device; meaningful on a GPU only)."""
    gpu = results["device"] == "cuda"
    for part, (key, op, bound, text) in TARGETS.items():
        v = results["parts"].get(part, {}).get(key)
        met = None if v is None else {"<": v < bound, "<=": v <= bound, ">=": v >= bound}[op]
        results["targets"][part] = {"target": text, "value": v, "met": met, "meaningful": gpu}


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}"
    return str(v)


ROWS = {  # part -> (label, key): the table; the JSON has every number
    "bi_scoring": [("BI scoring tokens/s", "bi_tokens_per_s"), ("plain forward tokens/s", "forward_tokens_per_s"),
                   ("BI / plain throughput", "bi_vs_forward"),
                   ("streamed BI / plain throughput", "streamed_vs_forward"),
                   ("streamed peak estimate GiB", "streamed_memory_estimate_gib"),
                   ("streamed same ranking", "streamed_same_ranking"), ("scores finite", "scores_finite")],
    "base_selection": [("seconds (float32)", "seconds"), ("distances finite", "distances_finite")],
    "train_step": [("FlexiGPT step s", "flexigpt_step_s"), ("dense PEFT-LoRA step s", "dense_lora_step_s"),
                   ("FlexiGPT tokens/s", "flexigpt_tokens_per_s"), ("dense PEFT-LoRA tokens/s", "dense_lora_tokens_per_s"),
                   ("FlexiGPT / dense PEFT-LoRA", "flexigpt_vs_dense_lora")],
    "merged_forward": [("merged forward s", "merged_s"), ("dense forward s", "dense_s"),
                       ("merged / dense", "merged_vs_dense")],
    "decode": [("plain tokens/s", "plain_tokens_per_s"), ("speculative tokens/s", "speculative_tokens_per_s"),
               ("speculative speedup", "speculative_speedup"), ("acceptance rate", "acceptance_rate"),
               ("identical to plain", "identical")],
    "fsdp": [("distributed type", "distributed_type"), ("FSDP units", "fsdp_units"), ("final loss", "final_loss"),
             ("saved model loads", "loads"), ("shared blocks tied", "ties_loaded"),
             ("NLL trained / loaded", "nll_trained"), ("", "nll_loaded"), ("launch + train + save s", "seconds"),
             ("worker peak GPU GiB", "worker_peak_gpu_gib")],
}


def print_table(results: dict) -> None:
    s = results["shape"]
    print(f"\ngpu_check ({results['mode']}, {results['device']}: {results['device_name']}): {s['blocks']} blocks, "
          f"hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} heads, vocab {s['vocab']}, "
          f"rank {s['rank']}, {len(s['pruned'])} pruned; torch {results['torch']}")
    print(f"{'part':18s} {'measure':30s} {'value':>14s}")
    for letter, part in PARTS.items():
        if part not in results["parts"]:
            continue
        out = results["parts"][part]
        label = f"{letter} {part}"
        for text, key in ROWS[part] + [("peak GPU GiB", "peak_gpu_gib"), ("ok", "ok")]:
            if key in out:
                print(f"{label:18s} {text:30s} {fmt(out[key]):>14s}")
                label = ""
        if "error" in out:
            print(f"{'':18s} error: {out['error'].splitlines()[0][:200]}")
    print("\ntargets" + ("" if results["device"] == "cuda" else " (not meaningful on CPU: shown for the record)"))
    for t in results["targets"].values():
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "missed")
        print(f"  {t['target']:55s} {fmt(t['value']):>10s}  {verdict}")
    if "note" in results["parts"].get("fsdp", {}):
        print(f"\nnote: {results['parts']['fsdp']['note']}")
    bad = [p for p, o in results["parts"].items() if not o["ok"]]
    print("\ngpu_check: " + ("all parts ok" if not bad else f"FAILED: {', '.join(bad)}"))


def main() -> None:
    ap = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run of the same code)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--parts", default="abcdef", help="letters of the parts to run (default abcdef)")
    ap.add_argument("--repeats", type=int, help="interleaved timing rounds (default 5, tiny 3)")
    ap.add_argument("--init", choices=tuple(fm.INIT_STRATEGIES), help="adapter init (default zeros, tiny svd_diff)")
    ap.add_argument("--decode-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights and compute of part e (default float32, see above)")
    ap.add_argument("--fsdp-worker", type=Path, metavar="DIR", help=argparse.SUPPRESS)  # part f's launched process
    a = ap.parse_args()
    if a.fsdp_worker is not None:
        fsdp_worker(a.fsdp_worker)
        return
    bad = sorted(set(a.parts) - set(PARTS))
    if bad:
        ap.error(f"--parts: unknown letters {bad}; use some of {''.join(PARTS)}")
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: the LLaMA-2-7B shape needs a GPU; run with --tiny for the CPU smoke run")
    shape = replace(TINY if a.tiny else FULL, **({"repeats": a.repeats} if a.repeats else {}))
    init = a.init or shape.init
    dev = torch.device("cpu" if a.tiny else "cuda")
    if a.tiny:
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest and polite on a shared machine
    results: dict[str, Any] = {
        "mode": "tiny" if a.tiny else "full", "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "shape": asdict(shape), "init": init, "parts": {}, "targets": {}}
    base = random_llama(shape, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    run = set(a.parts)
    plan = None
    if "a" in run:
        run_part(results, "bi_scoring", dev, lambda: part_bi_scoring(base, shape, dev))
    if "b" in run:
        plan = run_part(results, "base_selection", dev, lambda: part_base_selection(base, shape, dev))
    if plan is None and run & set("cdef"):
        plan = fallback_plan(base, shape)
    flexi = merged = None
    if run & set("cde"):
        flexi = run_part(results, "train_step", dev, lambda: part_train_step(base, plan, shape, dev, init)) \
            if "c" in run else build_flexi(base, plan, shape, dev, init)
    if run & set("de"):
        if flexi is None:
            not_run(results, "de" if "d" in run else "e", "needs the FlexiGPT model of part c, which failed")
        else:
            merged = run_part(results, "merged_forward", dev, lambda: part_merged_forward(base, flexi, shape, dev))
            if "d" not in run:  # built only for part e
                results["parts"].pop("merged_forward")
    flexi = None
    if "e" in run and "decode" not in results["parts"]:
        if merged is None:
            not_run(results, "e", "needs the merged model of part d, which failed")
        else:
            run_part(results, "decode", dev, lambda: part_decode(merged, shape, dev, a.decode_dtype))
    merged = None
    if "f" in run:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            run_part(results, "fsdp", dev, lambda: part_fsdp(base, plan, shape, dev, init, Path(tmp)))
    judge(results)
    print_table(results)
    results["ok"] = all(o["ok"] for o in results["parts"].values())
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()

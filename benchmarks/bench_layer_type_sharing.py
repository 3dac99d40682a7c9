"""Should a pruned global-attention block share a sliding-window block's weights? (`prune.base_layer_type`)

    python benchmarks/bench_layer_type_sharing.py [--steps 300] [--recovery 60] [--seeds 0 1 2]
        [--write benchmarks/results/layer_type_sharing.md]

Gemma 2/3 (and some Qwen / Mistral configs) mix sliding-window and global attention layers. A
FlexiGPT position keeps its own attention type (its mask, and for Gemma 3 its RoPE base), so a base
of the other type runs its weights under an attention pattern they were not trained for. This
measures the cost on a tiny Gemma 3 text model trained here from scratch on bytes of the
calibration text (no download; hidden 128, 8 blocks alternating sliding(64)/global):

1. train the dense model (``--steps`` full fine-tuning steps through :func:`flexigpt.train.train`);
2. for each pruned block (one sliding, one global, each pruned alone), build FlexiGPT with the
   nearest kept block *of the same type* and the nearest *of the other type* as base (the plan's
   distances, ``prune.metric`` lowrank), the default recipe otherwise (LoRA rank 16, svd_diff init,
   γ = 1e-3);
3. heldout NLL at init and after ``--recovery`` adapter-training steps, per training seed.

The numbers are printed (and written with ``--write``); the default ``same`` of
``prune.base_layer_type`` rests on them (docs/architectures.md).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexigpt.compress.plan import make_plan  # noqa: E402
from flexigpt.config import Params, data_dir  # noqa: E402
from flexigpt.data.text import read_source  # noqa: E402
from flexigpt.model import flexi as fm  # noqa: E402
from flexigpt.model.arch import arch_of  # noqa: E402
from flexigpt.model.forward import mean_nll  # noqa: E402
from flexigpt.train import TrainSettings, train  # noqa: E402

SEQ, DEPTH, WINDOW = 256, 8, 64
TYPES = ["sliding_attention", "full_attention"] * (DEPTH // 2)


def byte_rows(texts: list[str], n_rows: int, offset: int = 0) -> torch.Tensor:
    """``n_rows`` rows of ``SEQ`` UTF-8 bytes of the joined texts, starting ``offset`` rows in."""
    data = "\n\n".join(texts).encode("utf-8")[(offset * SEQ):(offset + n_rows) * SEQ]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long().view(-1, SEQ)


def tiny_gemma3(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma3_text", vocab_size=256, hidden_size=128, intermediate_size=384,
                               num_hidden_layers=DEPTH, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                               sliding_window=WINDOW, layer_types=list(TYPES), max_position_embeddings=SEQ,
                               tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def settings(steps: int, batch: int, lr: float, seed: int, **kw) -> TrainSettings:
    return TrainSettings(lr=lr, batch_size=batch, micro_batch=batch, token_budget=steps * batch * SEQ, seed=seed,
                         warmup_steps=max(1, steps // 20), dtype="float32", checkpoint_every=0, resume=False, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="dense pre-training steps (batch 16 x 256 bytes)")
    ap.add_argument("--recovery", type=int, default=60, help="adapter-training steps after pruning")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recovery training seeds")
    ap.add_argument("--write", type=Path, help="also write the table to this markdown file")
    a = ap.parse_args()
    t0 = time.process_time()
    p = Params.load(ROOT / "params.yaml")
    texts = read_source(p.str("calibration.source"), ROOT / data_dir(p), "text", "calibration.source").docs
    train_ids, held = byte_rows(texts, 2048), byte_rows(texts, 32, offset=2048)
    dense = tiny_gemma3()
    train(dense, train_ids, settings(a.steps, 16, 3e-3, 0, unfreeze_all=True), device="cpu")
    dense.eval()
    nll = lambda m: mean_nll(m, held, batch_size=8, dtype="float32")  # noqa: E731
    lines = [f"Tiny Gemma 3 text ({DEPTH} blocks, hidden 128, sliding window {WINDOW} / global alternating), "
             f"{a.steps} dense steps on bytes of `{p.str('calibration.source')}`; heldout: 32 x {SEQ} bytes.",
             f"Dense heldout NLL {nll(dense):.4f} nats/byte.", "",
             "| pruned block | its type | base | base type | distance | NLL at init | NLL after recovery "
             f"({a.recovery} steps, seeds {a.seeds}) |", "|---|---|---|---|---|---|---|"]
    for pruned in (4, 5):  # a sliding and a global block in the middle of the stack
        plan = make_plan(dense, None, blocks=[pruned], ratio=None, rank=16, progress=False)
        short = fm.build(copy.deepcopy(dense), fm.shortgpt_spec(DEPTH, [pruned]))
        lines.append(f"| {pruned} | {TYPES[pruned]} | (ShortGPT: dropped) | | | {nll(short):.5f} | |")
        row = plan.distances[pruned]
        for want_same in (True, False):
            cands = [j for j in row if (TYPES[j] == TYPES[pruned]) == want_same]
            base = min(cands, key=lambda j: (row[j], j))
            spec = fm.prune_spec(DEPTH, {pruned: base}, fm.LoraSettings(rank=16), gamma_init=1e-3, lora_on_kept=True)
            init_nll, after = None, []
            for seed in a.seeds:
                torch.manual_seed(seed)
                model = fm.build(copy.deepcopy(dense), spec)
                assert arch_of(model).layer_types() == TYPES  # the position keeps its own attention type
                init_nll = nll(model) if init_nll is None else init_nll
                train(model, train_ids, settings(a.recovery, 16, 4e-3, seed, norm_lr_mult=10.0), device="cpu")
                after.append(nll(model.eval()))
            sd = statistics.stdev(after) if len(after) > 1 else 0.0
            lines.append(f"| {pruned} | {TYPES[pruned]} | {base} | {TYPES[base]} | {row[base]:.3f} | {init_nll:.5f} | "
                         f"{statistics.mean(after):.4f} ± {sd:.4f} |")
            print(lines[-1], flush=True)
    lines += ["", f"NLL in nats per byte (PPL = e^NLL, e.g. e^{1.5:.1f} = {math.exp(1.5):.2f}); mean ± std over "
              f"recovery seeds. CPU time {time.process_time() - t0:.0f} s "
              "(process time, both cores)."]
    text = "\n".join(lines)
    print(text)
    if a.write:
        a.write.write_text(text + "\n")


if __name__ == "__main__":
    main()

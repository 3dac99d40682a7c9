"""Training step time: FlexiGPT (adapters on replaced blocks) vs PEFT LoRA on the dense model.

    python benchmarks/bench_train_step.py [--steps 4] [--micro 4] [--rank 32]

Same rank, batch, sequence length and dtype (`--dtype auto`: bf16 autocast only where native). Target: ratio <= 1.10.
"""
import argparse
import copy
import time

import torch
from common import base_model, parse_with_dtype, plan, split

from flexigpt.model import flexi as fm
from flexigpt.model.arch import arch_of
from flexigpt.model.forward import compute_context
from flexigpt.train import TrainSettings, lm_loss, select_trainable


def step_time(model, params, ids, steps: int, dtype: str) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for i in range(steps + 1):  # first step is warm-up
        t0 = time.perf_counter()
        with compute_context(dtype, model):
            loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    a, dtype = parse_with_dtype(ap)
    from peft import LoraConfig, get_peft_model

    base, _ = base_model()
    pl = plan()
    ids = split("train", a.micro)
    tokens = ids.numel()
    torch.manual_seed(0)
    flexi = fm.build(copy.deepcopy(base), fm.prune_spec(pl.num_blocks, pl.base, fm.LoraSettings(rank=a.rank)))
    lora, norms = select_trainable(flexi, TrainSettings())
    t_flexi = step_time(flexi, [p for _, p in lora + norms], ids, a.steps, dtype)
    del flexi
    targets = arch_of(base).target_names()  # the linears FlexiGPT adapts, on every block
    dense = get_peft_model(copy.deepcopy(base), LoraConfig(r=a.rank, lora_alpha=a.rank, target_modules=targets))
    t_dense = step_time(dense, [p for p in dense.parameters() if p.requires_grad], ids, a.steps, dtype)
    short = fm.build(copy.deepcopy(base), fm.shortgpt_spec(pl.num_blocks, pl.pruned, fm.LoraSettings(rank=a.rank)))
    lora_s, _ = select_trainable(short, TrainSettings())
    t_short = step_time(short, [p for _, p in lora_s], ids, a.steps, dtype)
    print(f"batch {a.micro} x {ids.shape[1]} tokens, rank {a.rank}, {dtype}, median of {a.steps} steps")
    print(f"{'model':28s} {'step s':>8s} {'tokens/s':>9s}")
    rows = (("FlexiGPT", t_flexi), (f"dense + PEFT LoRA (all {pl.num_blocks})", t_dense), ("ShortGPT + LoRA", t_short))
    for name, t in rows:
        print(f"{name:28s} {t:8.2f} {tokens / t:9.0f}")
    print(f"\nFlexiGPT / dense-PEFT-LoRA step-time ratio = {t_flexi / t_dense:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()

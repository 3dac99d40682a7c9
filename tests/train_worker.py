"""Tiny deterministic training run, launched by the tests as a subprocess (plain or accelerate launch).

Writes the final trainable tensors and the loss history to --out (a folder).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_llama  # noqa: E402

from flexigpt.model import flexi as fm  # noqa: E402
from flexigpt.train import TrainSettings, train  # noqa: E402


def data(n: int = 64, t: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 128, (8, t), generator=g)
    return base.repeat(n // 8, 1)  # learnable: 8 distinct sequences repeated


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--ckpt-every", type=int, default=3)
    a = ap.parse_args()
    model = fm.build(make_tiny_llama(), fm.prune_spec(6, {2: 1, 4: 5}, fm.LoraSettings(rank=4), gamma_init=0.05))
    s = TrainSettings(lr=5e-3, batch_size=8, micro_batch=a.micro, token_budget=8 * 32 * a.steps, warmup_steps=2,
                      dtype="float32", checkpoint_every=a.ckpt_every)
    res = train(model, data(), s, ckpt_dir=a.ckpt, on_step=lambda r: time.sleep(a.sleep))
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        named = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(named, str(out / "trainable.safetensors"))
        (out / "history.json").write_text(json.dumps(res.history))


if __name__ == "__main__":
    main()

"""Why `svd_init` used to give other weights on every run, and that it no longer does.

Builds FlexiGPT at init twice from the same base model and plan, with the global RNG in a
different state each time (as two separate processes would have it), and counts the LoRA
tensors that differ:

* ``unseeded``: ``flexi_model.build`` alone, as the stage called it before issue 13;
* ``seeded``: ``variants.build_variant``, which seeds torch from params ``seed`` before building.

    python benchmarks/build_determinism.py            # needs paths.base_model and paths.plan (dvc repro)
"""
from __future__ import annotations

import argparse
import copy

import torch

from common import ROOT  # noqa: F401  (puts the project on sys.path)
from flexigpt.model import flexi as fm
from flexigpt import variants
from flexigpt.config import Params
from flexigpt.model.importer import load_plain
from flexigpt.compress.plan import Plan


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if fm.is_lora_param(n)}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> tuple[int, int]:
    names = [n for n in a if part in n]
    return sum(not torch.equal(a[n], b[n]) for n in names), len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    a = ap.parse_args()
    p = Params.load(a.params)
    base, _ = load_plain(ROOT / p.get("paths.base_model"))
    plan = Plan.load(ROOT / p.get("paths.plan"))
    spec = variants.flexigpt_spec(p, plan)
    for how in ("unseeded", "seeded"):
        runs = []
        for rng_state in (1, 2):  # what ran before the build differs between two processes
            torch.manual_seed(rng_state)
            torch.rand(rng_state * 7)
            if how == "unseeded":
                model = copy.deepcopy(base)
                fm.build(model, spec)
            else:
                model = variants.build_variant(base, "flexigpt", p, plan)
            runs.append(lora_tensors(model))
            del model
        for part in ("lora_A", "lora_B"):
            n, total = differing(runs[0], runs[1], part)
            print(f"{how:9s} {part}: {n} of {total} tensors differ between two builds")


if __name__ == "__main__":
    main()

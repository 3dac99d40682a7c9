"""Start PPL of FlexiGPT at init vs ShortGPT and dense, with ablations, and bytes on disk.

    python benchmarks/bench_flexi_init.py [--gamma 1e-3] [--rank 32]

Uses the pipeline's plan (``paths.plan``) and heldout split (``paths.data``: WikiText-2 windows).
Acceptance (issue 4): start PPL within 10% of ShortGPT; without output norm orders of magnitude
worse; compact artifact smaller than dense by about the pruned share minus the adapters.
"""
import argparse
import copy
import math
import tempfile
import time

from common import base_model, parse_with_dtype, plan, split

from flexigpt.model import checkpoint as compact
from flexigpt.model import flexi as fm
from flexigpt.model.forward import mean_nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gamma", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    a, dtype = parse_with_dtype(ap)
    base, _ = base_model()
    pl, ids = plan(), split("heldout")
    L = pl.num_blocks
    lora = lambda init="svd_diff": fm.LoraSettings(rank=a.rank, init=init)  # noqa: E731
    variants = {
        "dense": None,
        "shortgpt": fm.shortgpt_spec(L, pl.pruned),
        "flexigpt (svd_diff, output norm)": fm.prune_spec(L, pl.base, lora(), gamma_init=a.gamma),
        "ablate output norm": fm.prune_spec(L, pl.base, lora(), output_norm=False),
        "ablate svd init (zeros)": fm.prune_spec(L, pl.base, lora("zeros"), gamma_init=a.gamma),
    }
    print(f"pruned {pl.pruned} bases {pl.base}; heldout {ids.numel()} tokens; rank {a.rank}, gamma_init {a.gamma}")
    print(f"{'variant':36s} {'start PPL':>12s} {'stored params':>14s} {'adapter params':>15s} {'s':>6s}")
    ppl = {}
    for name, spec in variants.items():
        t0 = time.time()
        m = copy.deepcopy(base)
        if spec is not None:
            fm.build(m, spec)
        ppl[name] = math.exp(mean_nll(m, ids, batch_size=a.batch_size, dtype=dtype))
        print(f"{name:36s} {ppl[name]:12.2f} {fm.unique_params(m):14,d} {fm.adapter_params(m):15,d} {time.time() - t0:6.1f}")
        if name.startswith("flexigpt"):
            with tempfile.TemporaryDirectory() as d:
                compact.save(m, d)
                flexi_bytes = compact.dir_bytes(d)
        del m
    dense_bytes = compact.dir_bytes_of_model(base)
    r = ppl["flexigpt (svd_diff, output norm)"] / ppl["shortgpt"]
    print(f"\nstart PPL / ShortGPT PPL = {r:.3f} (target <= 1.10; paper 21.82/22.76 = 0.959)")
    print(f"no-output-norm start PPL / FlexiGPT start PPL = {ppl['ablate output norm'] / ppl['flexigpt (svd_diff, output norm)']:.1f}x")
    share = 1 - pl.params_after / pl.params_before
    print(f"disk: dense {dense_bytes / 1e6:.1f} MB, FlexiGPT compact {flexi_bytes / 1e6:.1f} MB "
          f"({100 * (1 - flexi_bytes / dense_bytes):.1f}% smaller; pruned share of params {100 * share:.1f}%)")


if __name__ == "__main__":
    main()

"""Score blocks under an address-space cap (launched by tests/test_stream.py as a subprocess).

``python tests/stream_worker.py FOLDER WARM_FOLDER IDS_FILE MODE BUDGET_MB``: MODE ``stream`` scores
with the layer-wise reader, ``full`` loads the whole model first. Both paths first run once on the
small model in WARM_FOLDER, so every lazy import is done; the cap is then the address space in use
plus BUDGET_MB. Prints one JSON line.
"""
import json
import resource
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexigpt.compress.importance import score_blocks
from flexigpt.model.stream import StreamedModel


def vm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def main() -> None:
    folder, warm, ids_file, mode, budget_mb = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    torch.set_num_threads(1)  # no thread pools (and their arenas) appear after the cap
    ids = load_file(ids_file)["input_ids"]
    for m in (StreamedModel(warm), AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32).eval()):
        score_blocks(m, ids, method="block_influence", batch_size=2, dtype="float32", progress=False)
    cap = vm_bytes() + budget_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        model = StreamedModel(folder) if mode == "stream" else \
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        scores = score_blocks(model, ids, method="block_influence", batch_size=2, dtype="float32", progress=False).scores
    except (MemoryError, RuntimeError, OSError) as e:
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}))
        return
    print(json.dumps({"ok": True, "scores": scores}))


if __name__ == "__main__":
    main()

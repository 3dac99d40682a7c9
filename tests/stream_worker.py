"""Score blocks and report the peak resident memory it took (launched by tests/test_stream.py as a subprocess).

``python tests/stream_worker.py FOLDER WARM_FOLDER IDS_FILE MODE``: MODE ``stream`` scores with the
layer-wise reader, ``full`` loads the whole model first. Both paths first run once on the small model
in WARM_FOLDER, so every lazy import is done; then the kernel's peak-RSS mark (VmHWM) is reset and the
pass's peak resident memory above the starting RSS is measured. Prints one JSON line.

Why a measurement and not an address-space cap: under RLIMIT_AS, allocator and thread-pool address
reservations (not memory in use) decided pass or fail, and the test flaked between machines.
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexigpt.compress.importance import score_blocks
from flexigpt.model.stream import StreamedModel


def status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def main() -> None:
    folder, warm, ids_file, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    ids = load_file(ids_file)["input_ids"]
    for m in (StreamedModel(warm), AutoModelForCausalLM.from_pretrained(warm, dtype=torch.float32).eval()):
        score_blocks(m, ids, method="block_influence", batch_size=2, dtype="float32", progress=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = status_kb("VmRSS")
    model = StreamedModel(folder) if mode == "stream" else \
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    scores = score_blocks(model, ids, method="block_influence", batch_size=2, dtype="float32", progress=False).scores
    print(json.dumps({"scores": scores, "peak_growth_mb": (status_kb("VmHWM") - start) / 1024}))


if __name__ == "__main__":
    main()

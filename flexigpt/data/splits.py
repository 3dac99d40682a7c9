"""The token splits every later phase reads: calibration (scoring), train (recovery), heldout (PPL).

:func:`prepare` turns the ``calibration.*`` / ``heldout.*`` settings and a tokenizer into the
split files; :func:`load_split` is the one reader of them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flexigpt.config import Settings, setting
from flexigpt.data.packing import SplitSpec, build_splits
from flexigpt.data.text import read_source
from flexigpt.errors import FlexiError
from flexigpt.fileio import atomic_dir, sha256_file, write_json

SPLITS = ("calibration", "train", "heldout")


def _local_only(key: str, source: str) -> None:
    """DVC hashes files, not hub datasets: an ``hf:`` source would be a dependency that never exists."""
    if source.startswith("hf:"):
        raise FlexiError(key, f"{source!r} is a hub dataset, which DVC cannot hash or track",
                         f"snapshot it once: `flexigpt fetch-text {source} --out <data.dir>/NAME.jsonl`, "
                         f"then set `{key}: NAME.jsonl`")


@dataclass(frozen=True)
class CalibrationSettings(Settings):
    """Text for calibration and training, and how it is packed (params ``calibration.*``)."""

    SECTION = "calibration"
    source: str = setting("calibration/calib_text.jsonl", "path under data.dir (jsonl/txt/folder); snapshot a hub "
                          "dataset first with `flexigpt fetch-text`")
    text_field: str = setting("text", "jsonl/hub field holding the text")
    seq_len: int = setting(512, "tokens per packed sequence (all splits)", min=2)
    n_sequences: int = setting(64, "calibration split size, in sequences", min=1)
    train_tokens: int = setting(262144, "train split size, in tokens (rounded down to whole sequences)", min=1)

    def check(self) -> None:
        _local_only("calibration.source", self.source)
        if self.train_tokens < self.seq_len:
            raise FlexiError("calibration.train_tokens", f"{self.train_tokens} is less than one sequence "
                             f"({self.seq_len})", f"set it to at least calibration.seq_len = {self.seq_len}")


@dataclass(frozen=True)
class HeldoutSettings(Settings):
    """The perplexity text, disjoint from calibration/train by document (params ``heldout.*``)."""

    SECTION = "heldout"
    source: str = setting("wikitext2/test.jsonl", "path under data.dir (jsonl/txt/folder); snapshot a hub "
                          "dataset first with `flexigpt fetch-text`")
    text_field: str = setting("text", "jsonl/hub field holding the text")
    join: str = setting("\n\n", "string joining heldout rows before tokenizing (WikiText-2 protocol)")
    n_sequences: int | None = setting(16, "heldout windows of seq_len tokens; null = every full window",
                                      type=int, min=1, nullable=True)

    def check(self) -> None:
        _local_only("heldout.source", self.source)


def prepare(cal: CalibrationSettings, held: HeldoutSettings, seed: int, data_dir: Path, tokenizer,
            max_positions: int | None, out: str | os.PathLike) -> dict[str, Any]:
    """Read the sources, pack the three splits and write them (atomically) to ``out``; return the manifest."""
    if max_positions is not None and cal.seq_len > max_positions:
        raise FlexiError("calibration.seq_len", f"{cal.seq_len} exceeds the model's maximum length {max_positions}",
                         f"set it to at most {max_positions}")
    spec = SplitSpec(seq_len=cal.seq_len, n_calibration=cal.n_sequences, train_tokens=cal.train_tokens,
                     n_heldout=held.n_sequences, seed=seed, heldout_join=held.join)
    pool = read_source(cal.source, data_dir, cal.text_field, "calibration.source")
    same = _same_source(held.source, cal.source, data_dir)
    held_src = pool if same else read_source(held.source, data_dir, held.text_field, "heldout.source")
    splits, stats = build_splits(pool.docs, None if same else held_src.docs, tokenizer, spec)
    keys = {"calibration": stats.pop("calibration_doc_keys"), "train": stats.pop("train_doc_keys")}
    manifest = {
        "seed": seed, "seq_len": cal.seq_len, "tokenizer": tokenizer.name_or_path,
        "splits": {k: {"sequences": int(v.shape[0]), "tokens": int(v.numel()), "file": f"{k}.safetensors"}
                   for k, v in splits.items()},
        "sources": {"calibration": {"spec": pool.spec, "sha256": pool.files},
                    "heldout": {"spec": held_src.spec, "sha256": held_src.files}},
        "stats": stats,
    }
    with atomic_dir(out) as tmp:
        for k, v in splits.items():
            save_file({"input_ids": v.contiguous()}, str(tmp / f"{k}.safetensors"), metadata={"seq_len": str(cal.seq_len)})
            manifest["splits"][k]["sha256"] = sha256_file(tmp / f"{k}.safetensors")  # load_split checks it
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "doc_keys.json", keys)
    return manifest


def _same_source(a: str, b: str, data_dir: Path) -> bool:
    """Do two source specs name the same text (``x.jsonl`` and ``./x.jsonl`` do)?"""
    if a.startswith("hf:") or b.startswith("hf:"):
        return a == b
    return (data_dir / a).resolve() == (data_dir / b).resolve()


def _manifest_sha(folder: Path, name: str) -> str | None:
    m = folder / "manifest.json"
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())["splits"][name].get("sha256")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def load_split(data: str | os.PathLike, name: str, n: int | None = None, param: str = "paths.data") -> torch.Tensor:
    """Split ``name`` of the data folder as int64 ``[N, T]`` (its first ``n`` rows when given)."""
    path = Path(data) / f"{name}.safetensors"
    if not path.is_file():
        raise FlexiError(param, f"no {name} split at {path}",
                         "run the prepare_calibration stage first (`dvc repro prepare_calibration`)")
    want = _manifest_sha(Path(data), name)
    if want is not None and sha256_file(path) != want:
        raise FlexiError(param, f"{path} does not match its sha256 in manifest.json (corrupt or edited)",
                         "re-run prepare_calibration (`dvc repro -f prepare_calibration`)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise FlexiError(param, f"{path} is not a readable safetensors file ({type(e).__name__}: {e})",
                         "re-run prepare_calibration (`dvc repro -f prepare_calibration`)") from None
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2 or ids.is_floating_point():
        raise FlexiError(param, f"{path} has no integer 'input_ids' [N>=1, T>=2]",
                         "re-run prepare_calibration (`dvc repro -f prepare_calibration`)")
    return ids.long()[:n] if n is not None else ids.long()

"""The token splits every later phase reads: calibration (scoring), train (recovery), heldout (PPL).

:func:`prepare` turns the ``calibration.*`` / ``heldout.*`` settings and a tokenizer into the
split files; :func:`load_split` reads a (small) split whole, :func:`open_split` reads one lazily,
row by row (the train split, which may hold billions of tokens).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    """Read the sources, pack the three splits and write them (atomically) to ``out``; return the manifest.

    The train split is streamed into its file as it is packed (:class:`RowWriter`): memory holds a chunk
    of its tokens, never the split. The source texts are read whole.
    """
    if max_positions is not None and cal.seq_len > max_positions:
        raise FlexiError("calibration.seq_len", f"{cal.seq_len} exceeds the model's maximum length {max_positions}",
                         f"set it to at most {max_positions}")
    spec = SplitSpec(seq_len=cal.seq_len, n_calibration=cal.n_sequences, train_tokens=cal.train_tokens,
                     n_heldout=held.n_sequences, seed=seed, heldout_join=held.join)
    pool = read_source(cal.source, data_dir, cal.text_field, "calibration.source")
    same = _same_source(held.source, cal.source, data_dir)
    held_src = pool if same else read_source(held.source, data_dir, held.text_field, "heldout.source")
    with atomic_dir(out) as tmp:
        with RowWriter(tmp / "train.safetensors", cal.train_tokens // cal.seq_len, cal.seq_len) as train:
            splits, stats = build_splits(pool.docs, None if same else held_src.docs, tokenizer, spec, train.write)
        shapes = {"calibration": tuple(splits["calibration"].shape), "train": train.shape,
                  "heldout": tuple(splits["heldout"].shape)}
        keys = {"calibration": stats.pop("calibration_doc_keys"), "train": stats.pop("train_doc_keys")}
        manifest = {
            "seed": seed, "seq_len": cal.seq_len, "tokenizer": tokenizer.name_or_path,
            # ids that start every row (BOS where the tokenizer adds one, as lm-eval does; [] for SmolLM2)
            "row_prefix_ids": stats.pop("row_prefix_ids"),
            "splits": {k: {"sequences": int(n), "tokens": int(n * t), "file": f"{k}.safetensors"}
                       for k, (n, t) in shapes.items()},
            "sources": {"calibration": {"spec": pool.spec, "sha256": pool.files},
                        "heldout": {"spec": held_src.spec, "sha256": held_src.files}},
            "stats": stats,
        }
        for k in SPLITS:
            if k in splits:  # train is already written
                save_file({"input_ids": splits[k].contiguous()}, str(tmp / f"{k}.safetensors"),
                          metadata={"seq_len": str(cal.seq_len)})
            manifest["splits"][k]["sha256"] = sha256_file(tmp / f"{k}.safetensors")  # load_split checks it
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "doc_keys.json", keys)
    return manifest


# -- the split file format: safetensors, one int tensor "input_ids" [N, T], metadata {"seq_len": "T"} -------

_INT_DTYPES = {"I8": "<i1", "U8": "<u1", "I16": "<i2", "U16": "<u2", "I32": "<i4", "U32": "<u4",
               "I64": "<i8", "U64": "<u8"}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_header(shape: tuple[int, int], metadata: dict[str, str], name: str = "input_ids") -> bytes:
    """The bytes ``save_file`` writes before the data of a file holding one int32 tensor ``name``:
    u64 length, then compact JSON (metadata first) padded with spaces to a multiple of 8."""
    info = {"dtype": "I32", "shape": list(shape), "data_offsets": [0, 4 * shape[0] * shape[1]]}
    head = json.dumps({"__metadata__": metadata, name: info}, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


class RowWriter:
    """Writes an int32 ``[n_rows, seq_len]`` split file block by block, as :func:`build_splits` packs it.

    The header is written first (the shape is known before the rows are), so the file is byte for byte
    what ``save_file({"input_ids": t}, path, metadata={"seq_len": ...})`` writes for the whole ``t``,
    without ``t`` ever being in memory. Leaving the ``with`` block early (an error) checks nothing.
    """

    def __init__(self, path: str | os.PathLike, n_rows: int, seq_len: int) -> None:
        self.path, self.shape, self.rows_written = Path(path), (n_rows, seq_len), 0
        self._f = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")  # as save_file
        self._f.write(safetensors_header(self.shape, {"seq_len": str(seq_len)}))

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (``[k, seq_len]``, any integer dtype that fits int32)."""
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or self.rows_written + rows.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: rows {rows.shape} do not fit {self.shape} after {self.rows_written} rows")
        self._f.write(np.ascontiguousarray(rows, dtype="<i4").tobytes())
        self.rows_written += rows.shape[0]

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type, *a) -> None:
        self._f.close()
        if exc_type is None and self.rows_written != self.shape[0]:  # a short file would be corrupt
            raise RuntimeError(f"{self.path}: {self.rows_written} of {self.shape[0]} rows written")


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


def _checked_path(data: str | os.PathLike, name: str, param: str) -> Path:
    """The file of split ``name``, after checking it exists and matches its sha256 in manifest.json."""
    path = Path(data) / f"{name}.safetensors"
    if not path.is_file():
        raise FlexiError(param, f"no {name} split at {path}",
                         "run the prepare_calibration stage first (`dvc repro prepare_calibration`)")
    want = _manifest_sha(Path(data), name)
    if want is not None and sha256_file(path) != want:  # read in chunks: the train split may be GBs
        raise FlexiError(param, f"{path} does not match its sha256 in manifest.json (corrupt or edited)",
                         "re-run prepare_calibration (`dvc repro -f prepare_calibration`)")
    return path


def load_split(data: str | os.PathLike, name: str, n: int | None = None, param: str = "paths.data") -> torch.Tensor:
    """Split ``name`` of the data folder as int64 ``[N, T]`` (its first ``n`` rows when given)."""
    path = _checked_path(data, name, param)
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


class SplitRows:
    """The rows of a split file, read on demand through a memory map of its data section.

    ``rows[idx]`` (an index tensor/array, an int or a slice) is an int64 tensor of just those rows, so
    reading a batch costs one batch of memory, whatever the split size. Open with :func:`open_split`.
    """

    def __init__(self, path: Path, param: str = "paths.data") -> None:
        self.path = path
        dtype, shape, start = _parse_header(path, param)
        self._rows = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._rows.shape)

    def __len__(self) -> int:
        return self._rows.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return torch.from_numpy(np.array(self._rows[idx], dtype=np.int64))  # a copy: the map stays read-only

    def __repr__(self) -> str:
        return f"SplitRows({self.path}, shape={tuple(self.shape)})"


def open_split(data: str | os.PathLike, name: str, param: str = "paths.data") -> SplitRows:
    """Split ``name`` of the data folder as a lazy :class:`SplitRows` (checked like :func:`load_split`)."""
    return SplitRows(_checked_path(data, name, param), param)


def _parse_header(path: Path, param: str) -> tuple[str, tuple[int, int], int]:
    """(numpy dtype, shape, byte offset) of ``input_ids`` in a safetensors file; FlexiError if unusable."""
    fix = "re-run prepare_calibration (`dvc repro -f prepare_calibration`)"

    def unreadable(why: str) -> FlexiError:
        return FlexiError(param, f"{path} is not a readable safetensors file ({why})", fix)

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise unreadable(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise unreadable(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # bad JSON or bad UTF-8
            raise unreadable(f"header is not JSON: {e}") from None
    info = header.get("input_ids") if isinstance(header, dict) else None
    shape = info.get("shape") if isinstance(info, dict) else None
    if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) for d in shape)
            or shape[0] < 1 or shape[1] < 2 or info.get("dtype") not in _INT_DTYPES):
        raise FlexiError(param, f"{path} has no integer 'input_ids' [N>=1, T>=2]", fix)
    dtype = _INT_DTYPES[info["dtype"]]
    offsets = info.get("data_offsets")
    nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or offsets[0] < 0 or offsets[1] - offsets[0] != nbytes):
        raise unreadable(f"'input_ids' data_offsets {offsets} do not fit its shape {shape}")
    if 8 + n + offsets[1] > size:
        raise unreadable(f"truncated: 'input_ids' ends at byte {8 + n + offsets[1]}, the file has {size}")
    return dtype, (shape[0], shape[1]), 8 + n + offsets[0]

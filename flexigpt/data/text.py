"""Read text documents from a data directory (jsonl / txt) or from the hub (``hf:`` specs).

Local spec: a path relative to the data directory (or absolute), naming a ``.jsonl`` file with a
text field, a ``.txt`` file (one document per blank-line-separated paragraph), or a folder of
such files. Hub spec: ``hf:NAME[:CONFIG]:SPLIT`` (online only).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from flexigpt.errors import FlexiError
from flexigpt.fileio import sha256_file

TEXT_SUFFIXES = (".jsonl", ".txt", ".raw")


@dataclass
class TextSource:
    """Documents read from one source, with the sha256 of every file they came from."""

    spec: str
    docs: list[str]
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256


def _read_jsonl(path: Path, text_field: str, param: str) -> list[str]:
    docs, bad = [], []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FlexiError(param, f"{path}:{ln} is not valid JSON ({e.msg})", "fix or remove that line") from None
            if not isinstance(row, dict) or text_field not in row:
                raise FlexiError(param, f"{path}:{ln} has no field {text_field!r}",
                                 "set the text_field param to the field that holds the text")
            if not isinstance(row[text_field], str):
                bad.append(ln)
                continue
            docs.append(row[text_field])
    if bad:  # str(None) would be packed as the word "None"
        raise FlexiError(param, f"{path}: {len(bad)} row(s) have a null or non-string {text_field!r} "
                         f"(first at line {bad[0]})", "remove those rows, or make the field a string")
    return docs


def _read_txt(path: Path) -> list[str]:
    return [p for p in path.read_text(encoding="utf-8").split("\n\n")]


def read_local(path: Path, text_field: str, param: str) -> TextSource:
    if not path.exists():
        raise FlexiError(param, f"data path {path} ({path.resolve()}) does not exist",
                         "check the path and params data.dir (the data folder this stage reads)")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES)
    if not files:
        raise FlexiError(param, f"folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files", "point it at text files")
    docs: list[str] = []
    hashes: dict[str, str] = {}
    for f in files:
        if not os.access(f, os.R_OK):
            raise FlexiError(param, f"data file {f} is not readable", f"fix its permissions (chmod +r {f})")
        try:
            docs += _read_jsonl(f, text_field, param) if f.suffix == ".jsonl" else _read_txt(f)
        except UnicodeDecodeError:
            raise FlexiError(param, f"data file {f} is not UTF-8 text", "convert it to UTF-8") from None
        hashes[str(f)] = sha256_file(f)
    return TextSource(str(path), docs, hashes)


def read_hub(spec: str, text_field: str, param: str) -> TextSource:
    parts = spec.removeprefix("hf:").split(":")
    if len(parts) not in (2, 3):
        raise FlexiError(param, f"bad hub spec {spec!r}", "write hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FlexiError(param, f"hub dataset {spec!r} requested while offline",
                         "use a local file, or snapshot it online with `flexigpt fetch-text`")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise FlexiError(param, f"could not load {spec!r} from the hub ({type(e).__name__}: {e})",
                         "check the name, config and split, and that you are online") from None
    if text_field not in ds.column_names:
        raise FlexiError(param, f"{spec!r} has no column {text_field!r} (columns: {ds.column_names})",
                         "set the text_field param")
    fp = getattr(ds, "_fingerprint", "")
    return TextSource(spec, [str(t) for t in ds[text_field]], {spec: f"hf-fingerprint:{fp}"})


def read_source(spec: str, data_dir: Path, text_field: str = "text", param: str = "source") -> TextSource:
    """Read documents for ``spec``; drops whitespace-only documents; errors if none remain."""
    if not isinstance(spec, str) or not spec:
        raise FlexiError(param, f"must be a path or hf: spec, got {spec!r}", "set it to a file under data.dir")
    src = read_hub(spec, text_field, param) if spec.startswith("hf:") else \
        read_local(Path(spec) if Path(spec).is_absolute() else data_dir / spec, text_field, param)
    src.docs = [d for d in src.docs if d.strip()]
    if not src.docs:
        raise FlexiError(param, f"{spec} contains no text (every document is empty)", "point it at a non-empty source")
    return src

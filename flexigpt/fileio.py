"""Atomic artifact writing and content hashing.

Every artifact is written to a temporary sibling path and renamed into place, so a crash or a
bad input never leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flexigpt.errors import FlexiError

MARKER = ".flexigpt-output"
"""A file every folder written by :func:`atomic_dir` carries: proof that a later run may replace it."""
MARKER_TEXT = "written by flexigpt; a later run may replace this folder\n"

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of each file under ``path`` (a file or a directory), keyed by relative path."""
    p = Path(path)
    if p.is_file():
        return {p.name: sha256_file(p)}
    return {str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()}


def _tmp_sibling(dest: Path, is_dir: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        os.chmod(tmp, 0o755)
        return tmp
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    os.close(fd)
    os.chmod(name, 0o644)
    return Path(name)


def _dvc_lock_outs(root: Path) -> set[Path]:
    """Output paths recorded in ``<root>/dvc.lock`` (what an earlier ``dvc repro`` of ours wrote)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return set()
    import yaml

    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError:
        return set()
    outs: set[Path] = set()
    for stage in (data.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and isinstance(out.get("path"), str):
                outs.add((root / out["path"]).resolve())
    return outs


def is_ours(dest: str | os.PathLike) -> bool:
    """True if ``dest`` may be replaced: absent, an empty folder, a folder carrying :data:`MARKER`,
    or an output an earlier ``dvc repro`` recorded in ``./dvc.lock`` (the file itself or a folder above it)."""
    p = Path(dest)
    if not p.exists() and not p.is_symlink():
        return True
    if p.is_dir() and not p.is_symlink() and ((p / MARKER).is_file() or not any(p.iterdir())):
        return True
    outs = _dvc_lock_outs(Path.cwd())
    rp = p.resolve()
    return any(rp == o or o in rp.parents for o in outs)


def check_replaceable(dest: str | os.PathLike, *, kind: str, param: str = "output path") -> None:
    """Refuse (FlexiError naming ``param``) to replace what flexigpt did not write.

    ``kind`` is ``"file"`` or ``"dir"``: the kind about to be written. A file never replaces a folder;
    a folder replaces only a folder of ours (see :func:`is_ours`) and never a file that is not ours.
    """
    p = Path(dest)
    if kind == "file" and p.is_dir() and not p.is_symlink():
        raise FlexiError(param, f"{p} is an existing folder, but a file is written there",
                         "point it at a file path (e.g. metrics/name.json), not a folder")
    if kind == "dir" and p.exists() and not is_ours(p):
        what = "folder" if p.is_dir() else "file"
        raise FlexiError(param, f"{p} is an existing {what} that flexigpt did not write (no {MARKER} in it, "
                         "not an output in dvc.lock); replacing it would delete its contents",
                         "choose a new or empty folder, or move it away yourself")


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` entries a killed writer left in ``folder``.

    Call only while holding the project's stage lock (:func:`flexigpt.pipeline.stagekit.stage_lock`),
    so that no live writer owns them. Returns what was removed."""
    d = Path(folder)
    if not d.is_dir():
        return []
    gone = sorted(d.glob(".*.tmp-*")) + sorted(d.glob(".*.old-*"))
    for q in gone:
        shutil.rmtree(q, ignore_errors=True) if q.is_dir() and not q.is_symlink() else q.unlink(missing_ok=True)
    return gone


def _replace(tmp: Path, dest: Path) -> None:
    check_replaceable(dest, kind="dir" if tmp.is_dir() else "file")
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    tmp = _tmp_sibling(dest, is_dir=True)
    try:
        check_replaceable(dest, kind="dir")  # before the work, not after it
        yield tmp
        (tmp / MARKER).write_text(MARKER_TEXT)
        _replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file path that replaces ``dest`` only if the block succeeds."""
    dest = Path(dest)
    tmp = _tmp_sibling(dest, is_dir=False)
    try:
        check_replaceable(dest, kind="file")
        yield tmp
        _replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_file(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


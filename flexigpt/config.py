"""params.yaml access with validation.

``params.yaml`` is the single source of truth. Stages read it through :class:`Params`, whose
typed getters validate each key and raise :class:`~flexigpt.errors.FlexiError` naming the key
and the fix, before any heavy work starts.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import FlexiError

_MISSING = object()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Params:
    """Dotted-key view of a params dict with validating getters."""

    def __init__(self, data: dict[str, Any], path: str | os.PathLike = "params.yaml") -> None:
        self.data, self.path = data, Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike = "params.yaml") -> "Params":
        p = Path(path)
        if not p.is_file():
            raise FlexiError("params.yaml", f"not found at {p.resolve()}",
                             "run from the project root, or pass --params PATH")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FlexiError("params.yaml", f"is not valid YAML ({e})", "fix the syntax") from None
        if not isinstance(data, dict):
            raise FlexiError("params.yaml", "top level must be a mapping", "use `key: value` groups")
        return cls(data, p)

    def with_overrides(self, overrides: dict[str, Any]) -> "Params":
        """A copy with dotted keys replaced (``{"train.lr": 1e-3}``), as ``dvc exp run -S`` does."""
        data = copy.deepcopy(self.data)
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return Params(data, self.path)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is _MISSING:
                    raise FlexiError(key, f"missing from {self.path}", f"add `{key}` to {self.path}")
                return default
            node = node[part]
        return node

    def section(self, key: str) -> dict[str, Any]:
        v = self.get(key, {})
        if not isinstance(v, dict):
            raise FlexiError(key, "must be a mapping", f"write `{key}:` as a group of keys")
        return v

    def int(self, key: str, *, min: int | None = None, max: int | None = None,
            default: Any = _MISSING, allow_none: bool = False) -> int | None:
        return check_int(key, self.get(key, default), min=min, max=max, allow_none=allow_none)

    def float(self, key: str, *, min: float | None = None, max: float | None = None,
              min_exclusive: bool = False, default: Any = _MISSING) -> float:
        return check_float(key, self.get(key, default), min=min, max=max, min_exclusive=min_exclusive)

    def str(self, key: str, *, choices: list[str] | None = None, default: Any = _MISSING) -> str:
        v = self.get(key, default)
        if not isinstance(v, str) or not v:
            raise FlexiError(key, f"must be a non-empty string, got {v!r}", f"set `{key}` to text")
        if choices is not None and v not in choices:
            raise FlexiError(key, f"unknown value {v!r}", f"use one of: {', '.join(choices)}")
        return v

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise FlexiError(key, f"must be true or false, got {v!r}", f"set `{key}: true` or `false`")
        return v

    def flat(self) -> dict[str, Any]:
        return flatten(self.data)


def check_int(key: str, v: Any, *, min: int | None = None, max: int | None = None,
              allow_none: bool = False) -> int | None:
    """Validate an integer count (rejects bools, floats with fractions and strings)."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise FlexiError(key, f"must be a whole number, got {v!r}", f"set `{key}` to an integer")
    v = int(v)
    if min is not None and v < min:
        raise FlexiError(key, f"must be >= {min}, got {v}", f"set `{key}` to at least {min}")
    if max is not None and v > max:
        raise FlexiError(key, f"must be <= {max}, got {v}", f"set `{key}` to at most {max}")
    return v


def check_float(key: str, v: Any, *, min: float | None = None, max: float | None = None,
                min_exclusive: bool = False) -> float:
    """Validate a real number, optionally bounded."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FlexiError(key, f"must be a number, got {v!r}", f"set `{key}` to a number")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise FlexiError(key, f"must be finite, got {v}", f"set `{key}` to a finite number")
    if min is not None and (v <= min if min_exclusive else v < min):
        op = ">" if min_exclusive else ">="
        raise FlexiError(key, f"must be {op} {min}, got {v}", f"set `{key}` {op} {min}")
    if max is not None and v > max:
        raise FlexiError(key, f"must be <= {max}, got {v}", f"set `{key}` to at most {max}")
    return v


DATA_DIR_ENV = "FLEXIGPT_DATA_DIR"


def data_dir(params: Params) -> Path:
    """The offline data folder: params ``data.dir``, relative to the project root (the cwd of a stage).

    Only the param is read, never an environment variable: DVC sees params and the files listed as
    deps, so an env var that swapped the data would leave every result stale while ``dvc status``
    says "up to date". A set ``FLEXIGPT_DATA_DIR`` is therefore refused, with the `-S` to use instead.
    """
    if os.environ.get(DATA_DIR_ENV):
        raise FlexiError(DATA_DIR_ENV, f"is set ({os.environ[DATA_DIR_ENV]}), but stages read the data folder "
                         "only from params `data.dir`, so that DVC can see which data a result used",
                         f"unset {DATA_DIR_ENV} and set the folder with `dvc exp run -S data.dir=PATH` "
                         "(or edit data.dir in params.yaml)")
    d = params.get("data.dir")
    if not isinstance(d, str) or not d:
        raise FlexiError("data.dir", f"must be a folder path, got {d!r}", "set data.dir to e.g. ../shared/data")
    return Path(d).expanduser()

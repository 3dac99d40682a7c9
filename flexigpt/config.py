"""params.yaml access and the typed settings built from it.

``params.yaml`` is the single source of truth. Each section has one :class:`Settings` dataclass
(in the phase that uses it, as litgpt's ``args.py``) whose fields are the schema: type, default,
bounds, choices and help. ``SomeSettings.from_params(params)`` validates the whole section once,
before any heavy work, and raises :class:`~flexigpt.errors.FlexiError` naming the key and the fix
(unknown keys included, with the nearest known name).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from flexigpt.errors import FlexiError

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

    def __init__(self, data: dict[str, Any], path: str | os.PathLike = "params.yaml", *, complete: bool = False) -> None:
        # complete: read from a params file, where every section must be present (no hidden defaults)
        self.data, self.path, self.complete = data, Path(path), complete

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
        if "seed" in data:  # one seed for data and training made a training-seed sweep redo the data stages
            raise FlexiError("seed", "the top-level seed was split in two",
                             "replace it with `data.seed` (document shuffle, splits) and `train.seed` "
                             "(batch order, random adapter init)")
        return cls(data, p, complete=True)

    def with_overrides(self, overrides: dict[str, Any]) -> "Params":
        """A copy with dotted keys replaced (``{"train.lr": 1e-3}``), as ``dvc exp run -S`` does."""
        data = copy.deepcopy(self.data)
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return Params(data, self.path, complete=self.complete)

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


def _refuse_numeric_string(key: str, v: Any) -> None:
    """A number YAML read as text (``1e-3`` has no dot, or it was quoted): say so, and how to write it."""
    if not isinstance(v, str):
        return
    try:
        x = float(v)
    except ValueError:
        return
    plain = repr(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)
    sci = f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e+")
    raise FlexiError(key, f"is the string {v!r}, not a number (YAML reads exponents without a dot, "
                     "and anything quoted, as text)", f"write `{key}: {plain}` (or `{sci}`), unquoted")


def check_int(key: str, v: Any, *, min: int | None = None, max: int | None = None,
              allow_none: bool = False) -> int | None:
    """Validate an integer count (rejects bools, floats with fractions and strings)."""
    if v is None and allow_none:
        return None
    _refuse_numeric_string(key, v)
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
    _refuse_numeric_string(key, v)
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


# -- typed settings ------------------------------------------------------------------------------

S = TypeVar("S", bound="Settings")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, type: Any = None, choices: Any = None,
            min: float | None = None, max: float | None = None, min_exclusive: bool = False,
            nullable: bool = False) -> Any:
    """A settings field: its default, help text and the checks ``from_params`` applies.

    ``type`` is ``int``, ``float``, ``str``, ``bool``, ``list`` or ``dict`` (inferred from the
    default when omitted); ``choices`` a tuple of allowed values, or a callable returning them
    (for registries filled at import time); ``nullable`` admits ``null``.
    """
    kind = type if type is not None else builtins_type(default)
    meta = {"help": help, "type": kind, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive, "nullable": nullable or default is None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def builtins_type(default: Any) -> Any:
    if default is dataclasses.MISSING or default is None:
        raise TypeError("setting() needs type= when the default is missing or None")
    return default.__class__


def check_value(key: str, v: Any, meta: dict[str, Any]) -> Any:
    """One value against its field's metadata (see :func:`setting`)."""
    if v is None:
        if meta["nullable"]:
            return None
        raise FlexiError(key, "must be set (null is not allowed here)", f"give `{key}` a value")
    kind = meta["type"]
    if kind is int:
        v = check_int(key, v, min=meta["min"], max=meta["max"])
        if meta["min_exclusive"] and meta["min"] is not None and v <= meta["min"]:
            raise FlexiError(key, f"must be > {meta['min']}, got {v}", f"set `{key}` above {meta['min']}")
    elif kind is float:
        v = check_float(key, v, min=meta["min"], max=meta["max"], min_exclusive=meta["min_exclusive"])
    elif kind is bool:
        if not isinstance(v, bool):
            raise FlexiError(key, f"must be true or false, got {v!r}", f"set `{key}: true` or `false`")
    elif kind is str:
        if not isinstance(v, str) or not v:
            raise FlexiError(key, f"must be a non-empty string, got {v!r}", f"set `{key}` to text")
    elif kind is list:
        if not isinstance(v, list):
            raise FlexiError(key, f"must be a list, got {v!r}", f"write `{key}: [a, b]`")
    elif kind is dict:
        if not isinstance(v, dict):
            raise FlexiError(key, f"must be a group of keys, got {v!r}", f"write `{key}:` followed by indented keys")
    choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
    if choices is not None and v not in choices:
        raise FlexiError(key, f"unknown value {v!r}", f"use one of: {', '.join(map(str, choices))}")
    return v


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of a params.yaml section's settings; subclasses set ``SECTION`` and declare fields.

    ``SECTION = ""`` reads top-level keys (only the declared ones; other sections are ignored).
    Override :meth:`check` for checks across fields.
    """

    SECTION: ClassVar[str] = ""

    @classmethod
    def from_params(cls: type[S], params: "Params") -> S:
        """Build and validate from ``params`` (every key checked, unknown keys refused)."""
        prefix = f"{cls.SECTION}." if cls.SECTION else ""
        if cls.SECTION and params.complete and cls.SECTION not in params.data:
            raise FlexiError(cls.SECTION, f"section missing from {params.path}; its keys would silently take "
                             "built-in defaults", f"restore the `{cls.SECTION}:` section "
                             f"(`git checkout {params.path.name}` shows it), or write `{cls.SECTION}: {{}}` for the defaults")
        data = params.section(cls.SECTION) if cls.SECTION else params.data
        names = [f.name for f in dataclasses.fields(cls)]
        if cls.SECTION:
            for k in data:
                if k not in names:
                    near = difflib.get_close_matches(str(k), names, n=1)
                    raise FlexiError(f"{prefix}{k}", f"is not a setting of `{cls.SECTION}`",
                                     f"did you mean `{prefix}{near[0]}`?" if near else
                                     f"remove it; known keys: {', '.join(names)}")
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise FlexiError(f"{prefix}{missing[0]}", f"missing from {params.path}",
                             f"add `{prefix}{missing[0]}` to {params.path}")
        return cls(**values)

    def __post_init__(self) -> None:
        """Validate every field (built from params or directly), normalise it, then :meth:`check`."""
        prefix = f"{self.SECTION}." if self.SECTION else ""
        for f in dataclasses.fields(self):
            if "type" in f.metadata:
                object.__setattr__(self, f.name, check_value(f"{prefix}{f.name}", getattr(self, f.name), f.metadata))
        self.check()

    def check(self) -> None:
        """Checks across fields (after each field passed its own); raise FlexiError."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{key: help text}`` of every field (for docs and tests)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# -- the sections that belong to no phase ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataSettings(Settings):
    """Where the offline data lives (params ``data.*``)."""

    SECTION = "data"
    dir: str = setting("../shared/data", "offline data folder: absolute, or relative to the project root")
    seed: int = setting(0, "document shuffle of the calibration / train / heldout splits", min=0)


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
    return Path(DataSettings.from_params(params).dir).expanduser()


# -- presets: params fragments as `dvc exp run -S` flags ------------------------------------------------

def hydra_value(v) -> str:
    """A value in Hydra override syntax (what `dvc exp run -S` parses)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    return str(v)


def preset_flags(path: str, params: str = "params.yaml") -> list[str]:
    """``-S key=value`` flags for ``dvc exp run`` from a preset YAML.

    Nested groups are followed only as deep as params.yaml has groups, so a preset may replace a
    scalar by a map (e.g. a per-task ``evaluate.limit``).
    """
    import yaml

    base = yaml.safe_load(Path(params).read_text()) or {} if Path(params).is_file() else {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    flags: list[str] = []

    def walk(node: dict, ref, prefix: str) -> None:
        for k, v in node.items():
            r = ref.get(k) if isinstance(ref, dict) else None
            if isinstance(v, dict) and isinstance(r, dict):
                walk(v, r, f"{prefix}{k}.")
            else:
                flags.extend(["-S", f"{prefix}{k}={hydra_value(v)}"])

    walk(data, base, "")
    return flags

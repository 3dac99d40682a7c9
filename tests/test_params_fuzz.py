"""Every bad params.yaml value is refused by the schema with one error naming the key (no traceback).

Mutations are generated from the settings classes' own field metadata and applied one at a time to
the real params.yaml: a value of the wrong type, below a bound, outside the choices, null where null
is not allowed, a misspelt key, an unknown section. Each must raise :class:`FlexiError` whose
``param`` is the mutated key (or the section key for a misspelling) and whose ``fix`` is not empty.
"""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from conftest import ROOT
from flexigpt.config import Params
from flexigpt.errors import FlexiError
from flexigpt.pipeline import schema

BASE = Params.load(ROOT / "params.yaml").data


def _wrong_types(kind) -> list:
    return {int: ["12", 2.5, True, [1], {"a": 1}], float: ["1e-3", "fast", True, [0.1]],
            bool: ["false", "yes", 1, 0], str: [3, 1.5, True, ["a"], ""], list: [5, "a,b", {"a": 1}],
            dict: [5, "x", ["a"]]}.get(kind, [])


def mutations() -> list[tuple[str, str, object]]:
    """(key, expected param prefix, bad value) for every declared constraint of every section."""
    out = []
    for cls in schema.SETTINGS:
        for f in dataclasses.fields(cls):
            m, key = f.metadata, f"{cls.SECTION}.{f.name}"
            if "type" not in m:
                continue
            for v in _wrong_types(m["type"]):
                out.append((key, key, v))
            if not m["nullable"]:
                out.append((key, key, None))
            if m["min"] is not None and m["type"] in (int, float):
                out.append((key, key, m["min"] - 1 if m["type"] is int else m["min"] - 0.5))
                if m["min_exclusive"]:
                    out.append((key, key, m["min"]))
            if m["max"] is not None and m["type"] in (int, float):
                out.append((key, key, m["max"] + 1))
            if m["choices"] is not None:
                out.append((key, key, "no-such-choice"))
            # a misspelling of the key next to the right one
            out.append((f"{cls.SECTION}.{f.name}x", f"{cls.SECTION}.{f.name}x", 1))
    out += [("seed", "seed", 0), ("mode", "mode", "grow"), ("traim.lr", "traim", 0.1)]
    return out


MUTATIONS = mutations()


def test_there_are_at_least_200_mutations():
    assert len(MUTATIONS) >= 200


def _apply(key: str, value) -> Params:
    data = copy.deepcopy(BASE)
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return Params(data)


@pytest.mark.parametrize("key,param,value", MUTATIONS, ids=[f"{k}={v!r}"[:60] for k, _, v in MUTATIONS])
def test_each_bad_value_names_its_key(key, param, value):
    with pytest.raises(FlexiError) as e:
        schema.check(_apply(key, value))
    assert e.value.param == param or e.value.param.startswith(param + "."), (e.value.param, param)
    assert e.value.fix.strip()


def test_random_valid_edits_pass():
    """The other side: values inside every declared constraint are accepted (no false alarms)."""
    rng = random.Random(0)
    for _ in range(200):
        cls = rng.choice(schema.SETTINGS)
        f = rng.choice([f for f in dataclasses.fields(cls) if "type" in f.metadata])
        m = f.metadata
        if m["choices"] is not None:
            choices = m["choices"]() if callable(m["choices"]) else m["choices"]
            value = rng.choice(list(choices))
        elif m["type"] is int:  # around the current value, so cross-field checks (train_tokens >= seq_len) hold
            lo = int(m["min"] or 0) + (1 if m["min_exclusive"] else 0)
            cur = BASE.get(cls.SECTION, {}).get(f.name)
            cur = cur if isinstance(cur, int) and not isinstance(cur, bool) else lo + 4
            value = rng.randint(max(lo, cur), max(lo, cur) * 2 + 1)
        elif m["type"] is bool:
            value = rng.choice([True, False])
        else:
            continue  # strings, lists, floats: their valid values depend on the key
        if cls.SECTION == "compute" and f.name == "device":
            value = "auto" if value == "cuda" else value  # cuda needs a GPU
        schema.check(_apply(f"{cls.SECTION}.{f.name}", value))  # raises on a false alarm

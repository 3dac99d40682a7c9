"""Typed settings: one dataclass per params.yaml section, validated once, unknown keys refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import ROOT
from flexigpt.compress.importance import ImportanceSettings
from flexigpt.compress.plan import PruneSettings
from flexigpt.config import Params
from flexigpt.data.splits import CalibrationSettings, HeldoutSettings
from flexigpt.devices import ComputeSettings, resolve_device, resolve_dtype
from flexigpt.errors import FlexiError
from flexigpt.evaluate.suite import EvaluateSettings
from flexigpt.model.forward import compute_context
from flexigpt.model.importer import ModelSettings
from flexigpt.pipeline import schema
from flexigpt.train import TrainSettings
from flexigpt.variants import AdapterSettings, ExtendSettings, NormSettings, Recipe, SvdInitSettings

SECTIONS = schema.SETTINGS


def test_every_section_of_params_yaml_has_one_settings_class():
    p = Params.load(ROOT / "params.yaml")
    assert sorted(c.SECTION for c in SECTIONS) == sorted(k for k in p.data if k not in schema.TOP_LEVEL)
    built = schema.check(p)
    for cls in SECTIONS:
        fields = {f.name for f in dataclasses.fields(built[cls.SECTION])}
        assert set(p.section(cls.SECTION)) <= fields and len(fields - set(p.section(cls.SECTION))) <= 1, cls.__name__
    assert Recipe.from_params(p).mode == p.get("mode")


def test_an_unknown_section_is_refused():
    with pytest.raises(FlexiError, match="not a params.yaml section"):
        schema.check(Params.load(ROOT / "params.yaml").with_overrides({"trian.lr": 1e-3}))


def test_every_field_has_help_text():
    for cls in SECTIONS:
        assert all(cls.help().values()), f"{cls.__name__} has a field without help"


@pytest.mark.parametrize("key,value,words", [
    ("prune.rnak", 8, "did you mean `prune.rank`"),
    ("train.lr", 0, "train.lr"),
    ("train.lr", "fast", "number"),
    ("importance.method", "magic", "block_influence"),
    ("evaluate.tasks", ["arc_easy", "nope"], "nope"),
    ("adapters.init", "random", "svd_diff"),
    ("compute.threads", 0, ">= 1"),
    ("calibration.train_tokens", 100, "calibration.seq_len"),
])
def test_a_bad_value_names_the_key_and_the_fix(key, value, words):
    p = Params.load(ROOT / "params.yaml").with_overrides({key: value})
    section = key.split(".")[0]
    cls = next(c for c in SECTIONS if c.SECTION == section)
    with pytest.raises(FlexiError) as e:
        cls.from_params(p)
    assert e.value.param.startswith(section) and words in str(e.value)


def test_settings_are_frozen_and_validate_when_built_directly():
    s = PruneSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.rank = 4  # type: ignore[misc]
    with pytest.raises(FlexiError, match="prune.rank"):
        PruneSettings(rank=0)
    assert dataclasses.replace(s, rank=4).rank == 4


def test_data_and_training_seeds_are_separate(tmp_path):
    from flexigpt.config import DataSettings

    p = Params({"data": {"seed": 3}, "train": {"seed": 7}})
    assert (DataSettings.from_params(p).seed, TrainSettings.from_params(p).seed) == (3, 7)
    assert TrainSettings.from_params(Params({"train": {}})).seed == 0
    (tmp_path / "params.yaml").write_text("seed: 0\nmode: prune\n")  # a params file from before the split
    with pytest.raises(FlexiError) as e:
        Params.load(tmp_path / "params.yaml")
    assert e.value.param == "seed" and "data.seed" in e.value.fix and "train.seed" in e.value.fix


def test_cpu_device_policy():
    if torch.cuda.is_available():
        pytest.skip("the CPU policy is checked on CPU machines")
    assert resolve_device("auto").type == "cpu"
    assert resolve_dtype("auto", "cpu") in ("bfloat16", "float32")  # never float16
    with pytest.raises(FlexiError) as e:
        ComputeSettings(device="cuda")
    assert e.value.param == "compute.device" and "auto" in e.value.fix
    model = torch.nn.Linear(4, 4)
    with compute_context("bfloat16", model):
        assert torch.is_autocast_enabled("cpu")
    with compute_context("float32", model):
        assert not torch.is_autocast_enabled("cpu")


def test_the_schema_defaults_are_the_values_in_params_yaml():
    """One source of truth: a key left out of params.yaml means what params.yaml says it is."""
    p = Params.load(ROOT / "params.yaml")
    for cls in SECTIONS:
        if cls.SECTION == "compute":
            continue  # checked below (device auto needs no GPU)
        if cls is EvaluateSettings:  # evaluate.variants is required: it names the evaluate@<variant> stages
            assert cls.from_params(p) == cls(variants=p.get("evaluate.variants")), cls.__name__
            continue
        assert cls.from_params(p) == cls(), cls.__name__
    assert ComputeSettings.from_params(p) == ComputeSettings()

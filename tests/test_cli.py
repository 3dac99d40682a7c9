"""The flexigpt command: preset flags for `dvc exp run`, stage dispatch."""
import subprocess
import sys

import yaml

from flexigpt.pipeline.cli import preset_flags
from helpers import ROOT


def test_preset_flags_follow_params_groups(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"lr": 0.1, "batch_size": 8}, "evaluate": {"limit": 40}}))
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": {"lr": 0.004}, "evaluate": {"limit": {"hellaswag": 2000, "boolq": None}},
                                      "flag": True}))
    flags = preset_flags(str(preset), str(params))
    assert flags[::2] == ["-S"] * 3
    assert sorted(flags[1::2]) == ["evaluate.limit={boolq:null,hellaswag:2000}", "flag=true", "train.lr=0.004"]


def test_shipped_presets_parse():
    for f in sorted((ROOT / "configs" / "presets").glob("*.yaml")):
        flags = preset_flags(str(f), str(ROOT / "params.yaml"))
        assert flags and all(x == "-S" for x in flags[::2]), f


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "flexigpt.pipeline.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for stage in ("import-model", "prepare-calibration", "score-importance", "prune", "svd-init",
                  "train-adapters", "evaluate", "lineage", "preset"):
        assert stage in out.stdout

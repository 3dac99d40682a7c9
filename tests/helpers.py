"""Test helpers: a tiny saved model folder with a locally trained tokenizer, and stage runners."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs about "
         "rivers mountains and distant cities under pale blue skies").split()


def corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + f" doc{i}." for i in range(n_docs)]


def make_tokenizer():
    """A small word-level fast tokenizer trained offline, with an EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"], vocab_size=120)
    tok.train_from_iterator(corpus(200) + [f"doc{i}" for i in range(100)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def save_tiny_model_dir(path: Path, model=None) -> Path:
    from conftest import make_tiny_llama

    model = model or make_tiny_llama()
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def base_params(tmp: Path, model_source: str = "smollm2-135m") -> dict:
    """A params dict whose outputs all live under ``tmp``."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"]["source"] = model_source
    p["data"]["dir"] = str(tmp / "data")
    for k, v in p["paths"].items():
        p["paths"][k] = str(tmp / v)
    p["train_launch"]["config"] = str(ROOT / p["train_launch"]["config"])
    return p


def tiny_project_params(tmp: Path, model_dir: Path, train_tokens: int = 64) -> dict:
    """Params for a tiny project: base model = ``model_dir``, a small text corpus under ``tmp/data``."""
    p = base_params(tmp, str(model_dir))
    p["paths"]["base_model"] = str(model_dir)
    data = tmp / "data"
    write_jsonl(data / "calibration" / "calib_text.jsonl", corpus(120))
    write_jsonl(data / "wikitext2" / "test.jsonl", corpus(40, seed=7))
    p["calibration"].update(seq_len=16, n_sequences=4, train_tokens=train_tokens)
    p["heldout"]["n_sequences"] = 2
    return p


def run_stage(name: str, params: dict, tmp: Path, timeout: int = 600, mlflow_db: Path | None = None,
              args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``stages/<name>.py`` as DVC would, with params from ``params`` and MLflow under ``tmp``."""
    pfile = tmp / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    db = mlflow_db or Path(os.environ.get("FLEXIGPT_TEST_MLFLOW_DB", tmp / "mlflow.db"))
    env = {**os.environ, "FLEXIGPT_PARAMS": str(pfile), "FLEXIGPT_MLFLOW_URI": f"sqlite:///{db}",
           "FLEXIGPT_DATA_DIR": params["data"]["dir"], "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, f"stages/{name}.py", *(args or [])], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(res: subprocess.CompletedProcess, param: str) -> None:
    """A bad input exits 2 with one message naming ``param`` and a fix, and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert param in res.stderr and "fix:" in res.stderr, res.stderr[-2000:]

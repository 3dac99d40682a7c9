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
        p["paths"][k] = str(tmp / v) if isinstance(v, str) else v
    p["paths"]["outside_project"] = True  # stages run from the repo, writing under tmp
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
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("FLEXIGPT_DATA_DIR", None)  # stages read data.dir only (and refuse the variable)
    return subprocess.run([sys.executable, f"stages/{name}.py", *(args or [])], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(res: subprocess.CompletedProcess, param: str) -> None:
    """A bad input exits 2 with one message naming ``param`` and a fix, and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert param in res.stderr and "fix:" in res.stderr, res.stderr[-2000:]


# -- a copy of the project, run through its own dvc.yaml ----------------------------------------------

PIPELINE_STAGES = frozenset({"import_model", "prepare_calibration", "score_importance", "prune", "svd_init",
                             "train_flexigpt", "train_lora_baseline", "evaluate@dense", "evaluate@shortgpt",
                             "evaluate@lora_baseline", "evaluate@flexigpt", "compare"})
VENV_BIN = Path(sys.prefix) / "bin"


def tiny_pipeline_params(params: dict) -> dict:
    """The default params with budgets small enough for a few minutes on 2 cores (data.dir unchanged)."""
    params["calibration"].update(seq_len=128, n_sequences=8, train_tokens=128 * 16)
    params["heldout"]["n_sequences"] = 4
    params["importance"]["batch_size"] = 4
    params["prune"]["precision"] = "float32"
    params["train"].update(batch_size=4, micro_batch=2, token_budget=128 * 4 * 2)
    params["evaluate"].update(tasks=["arc_easy", "piqa"], limit=2, ppl_windows=[256], ppl_max_windows=1,
                              lm_eval_wikitext=False, batch_size=4)
    return params


def shell_env(project: Path, with_venv: bool) -> dict[str, str]:
    """A new shell's environment: no venv on PATH, or the venv activated (``with_venv``)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "FLEXIGPT_PARAMS", "FLEXIGPT_MLFLOW_URI", "MLFLOW_TRACKING_URI",
                        "FLEXIGPT_DATA_DIR", "DVC_STAGE", "DVC_ROOT", "PYTHONPATH")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()]
    env["PATH"] = os.pathsep.join(([str(VENV_BIN)] if with_venv else []) + path)
    env["PYTHONPATH"] = str(project)  # the copy's own flexigpt, not the checkout the editable install points at
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_in(project: Path, cmd: list[str], with_venv: bool, timeout: int = 1500) -> tuple[set[str], str]:
    """Run ``cmd`` in ``project``; return the stages DVC ran and the output."""
    import re

    res = subprocess.run(cmd, cwd=project, env=shell_env(project, with_venv), capture_output=True, text=True,
                         timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-6000:]}"
    return set(re.findall(r"Running stage '([^']+)'", out)), out


def copy_project(data_dir: Path, top: Path) -> Path:
    """Tracked (and untracked, not ignored) files -> ``top/main``, a fresh git repo with tiny params,
    beside ``top/shared`` (a link to the data's parent), so the default ``data.dir`` resolves."""
    import shutil

    (top / "shared").symlink_to(data_dir.parent)
    proj = top / "main"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)  # keeps mtimes, so make sees the venv as up to date
    (proj / "dvc.lock").unlink(missing_ok=True)
    params = tiny_pipeline_params(yaml.safe_load((proj / "params.yaml").read_text()))
    assert params["data"]["dir"] == "../shared/data"  # the default, unchanged
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["git", "init", "-q"], [str(VENV_BIN / "dvc"), "config", "--local", "cache.type", "hardlink,copy"],
                ["git", "add", "-A"], git + ["commit", "-q", "-m", "tiny"]):
        subprocess.run(cmd, cwd=proj, check=True, capture_output=True)
    return proj


def project_params(project: Path) -> dict:
    """The copy's params with every path made absolute (for running its stages directly)."""
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["data"]["dir"] = str((project / p["data"]["dir"]).resolve())
    p["paths"] = {k: str(project / v) if isinstance(v, str) else v for k, v in p["paths"].items()}
    p["paths"]["outside_project"] = True  # run from the repo, writing into the copy
    p["train_launch"]["config"] = str(project / p["train_launch"]["config"])
    p["evaluate"]["variants"] = {k: str(project / v) for k, v in p["evaluate"]["variants"].items()}
    return p

"""Every bad input to import_model / prepare_calibration fails fast and cleanly, with no artifact."""
import os

import pytest

from helpers import assert_clean_error, run_stage, save_tiny_model_dir, tiny_project_params, write_jsonl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """One tiny saved model (a HF folder, as import_model writes) and one MLflow store per module."""
    d = tmp_path_factory.mktemp("tiny")
    os.environ["FLEXIGPT_TEST_MLFLOW_DB"] = str(d / "mlflow.db")
    yield save_tiny_model_dir(d / "src_model")
    os.environ.pop("FLEXIGPT_TEST_MLFLOW_DB", None)


@pytest.fixture
def proj(tmp_path, tiny_dir):
    """Tiny data dir, and params whose base model is the tiny saved folder."""
    return tmp_path, tiny_project_params(tmp_path, tiny_dir)


def test_happy_path_tiny(proj):
    tmp, p = proj
    p["paths"]["base_model"] = str(tmp / "artifacts/base_model")
    res = run_stage("import_model", p, tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_stage("prepare_calibration", p, tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    man = json.loads((tmp / "artifacts/data/manifest.json").read_text())
    assert man["splits"]["train"]["tokens"] == 64 and man["seed"] == p["data"]["seed"]
    assert all(len(h) == 64 for h in man["sources"]["calibration"]["sha256"].values())


@pytest.mark.parametrize("source,param_hint", [
    ("no-such-model", "unknown source"),
    ("/nonexistent/model.gguf", "does not exist"),
])
def test_import_bad_source(proj, source, param_hint):
    tmp, p = proj
    p["model"]["source"] = source
    p["paths"]["base_model"] = str(tmp / "artifacts/base_model")
    res = run_stage("import_model", p, tmp)
    assert_clean_error(res, "model.source")
    assert param_hint in res.stderr
    assert not list(tmp.glob("artifacts/*"))


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF\x03\x00\x00\x00garbage-truncated"])
def test_import_corrupt_gguf(proj, content):
    tmp, p = proj
    bad = tmp / "broken.gguf"
    bad.write_bytes(content)
    p["model"]["source"] = str(bad)
    p["paths"]["base_model"] = str(tmp / "artifacts/base_model")
    res = run_stage("import_model", p, tmp)
    assert_clean_error(res, "model.source")
    assert "GGUF" in res.stderr
    assert not list(tmp.glob("artifacts/*"))


def test_import_folder_without_config(proj):
    tmp, p = proj
    (tmp / "empty").mkdir()
    p["model"]["source"] = str(tmp / "empty")
    p["paths"]["base_model"] = str(tmp / "artifacts/base_model")
    assert_clean_error(run_stage("import_model", p, tmp), "model.source")


def test_import_bad_dtype(proj):
    tmp, p = proj
    p["model"]["dtype"] = "float64"
    p["paths"]["base_model"] = str(tmp / "artifacts/base_model")
    assert_clean_error(run_stage("import_model", p, tmp), "model.dtype")


def _bad_calibration(tmp, p, param, **kw):
    for group, updates in kw.items():
        p[group].update(updates)
    res = run_stage("prepare_calibration", p, tmp)
    assert_clean_error(res, param)
    assert not (tmp / "artifacts/data").exists()
    return res


@pytest.mark.parametrize("param,group,updates", [
    ("calibration.seq_len", "calibration", {"seq_len": 0}),
    ("calibration.seq_len", "calibration", {"seq_len": -5}),
    ("calibration.seq_len", "calibration", {"seq_len": 4096}),  # tiny model max length is 128
    ("calibration.n_sequences", "calibration", {"n_sequences": "many"}),
    ("calibration.n_sequences", "calibration", {"n_sequences": -1}),
    ("calibration.train_tokens", "calibration", {"train_tokens": 10**7}),
    ("calibration.train_tokens", "calibration", {"train_tokens": 2.5}),
    ("heldout.n_sequences", "heldout", {"n_sequences": 0}),
    ("calibration.source", "calibration", {"source": "missing/file.jsonl"}),
])
def test_prepare_bad_params(proj, param, group, updates):
    tmp, p = proj
    res = _bad_calibration(tmp, p, param, **{group: updates})
    if updates.get("train_tokens") == 10**7:
        assert "holds only" in res.stderr  # says how much text there is


def test_prepare_empty_text(proj):
    tmp, p = proj
    write_jsonl(tmp / "data" / "calibration" / "calib_text.jsonl", ["", "   ", "\n"])
    res = _bad_calibration(tmp, p, "calibration.source")
    assert "no text" in res.stderr


def test_prepare_non_utf8_file(proj):
    tmp, p = proj
    f = tmp / "data" / "calibration" / "bad.txt"
    f.write_bytes(b"\xff\xfe\x00 not utf8 \xc3\x28")
    p["calibration"]["source"] = "calibration/bad.txt"
    res = _bad_calibration(tmp, p, "calibration.source")
    assert "UTF-8" in res.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file, so permissions cannot make it unreadable")
def test_prepare_unreadable_file(proj):
    tmp, p = proj
    f = tmp / "data" / "calibration" / "calib_text.jsonl"
    f.chmod(0)
    _bad_calibration(tmp, p, "calibration.source")


def test_prepare_without_import(proj):
    tmp, p = proj
    p["paths"]["base_model"] = str(tmp / "artifacts/base_model")
    res = run_stage("prepare_calibration", p, tmp)
    assert_clean_error(res, "paths.base_model")

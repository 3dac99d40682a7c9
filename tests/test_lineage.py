"""MLflow lineage: stage runs carry code/data/package tags, nest under one parent per execution."""
import pytest

from flexigpt.track import lineage, tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXIGPT_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n    params: [grp]\n  b:\n    cmd: y\n")
    (tmp_path / "params.yaml").write_text("grp:\n  k: 1\n")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_stage_run_tags_and_failed_status(store, monkeypatch):
    monkeypatch.setattr(lineage, "dvc_execution_key", lambda: None)
    with tracking.stage_run("a", "exp", {"grp": {"k": 1}}) as run:
        run.log_metrics({"m": {"x": 2.0}})
        run.set_tags({"data.sha256.f.jsonl": "abc"})
    r = store.get_run(run.run_id)
    for tag in ("git.commit", "git.dirty", "version.torch", "version.transformers", "version.lm_eval",
                "flexigpt.stage"):
        assert tag in r.data.tags, tag
    assert r.data.params["grp.k"] == "1" and r.data.metrics["m.x"] == 2.0
    with pytest.raises(RuntimeError):
        with tracking.stage_run("b", "exp", {}) as bad:
            raise RuntimeError("boom")
    assert store.get_run(bad.run_id).info.status == "FAILED"


def test_one_parent_per_execution_and_cached_links(store, monkeypatch):
    monkeypatch.setattr(lineage, "dvc_execution_key", lambda: "111-1")
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    with tracking.stage_run("a", "exp", {}) as a1:
        pass
    with tracking.stage_run("b", "exp", {}) as b1:
        pass
    assert a1.parent_id and a1.parent_id == b1.parent_id
    assert store.get_run(a1.parent_id).info.run_name == "my-exp"
    # a new execution in which only b runs: a appears as cached, linked to its producer
    monkeypatch.setattr(lineage, "dvc_execution_key", lambda: "222-2")
    with tracking.stage_run("b", "exp", {}) as b2:
        linked = lineage.link_cached_stages(b2.client, b2.experiment_id, b2.parent_id, lineage.pipeline_stages())
    assert b2.parent_id != a1.parent_id and linked == ["a"]
    kids = store.search_runs([b2.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{b2.parent_id}'")
    cached = [k for k in kids if k.data.tags.get("flexigpt.cached") == "true"]
    assert len(cached) == 1 and cached[0].data.tags["flexigpt.produced_by"] == a1.run_id
    text = lineage.describe(store, cached[0])
    assert a1.run_id in text and "git" in text


def test_find_run_by_metric_and_describe(store, monkeypatch):
    monkeypatch.setattr(lineage, "dvc_execution_key", lambda: None)
    with tracking.stage_run("a", "exp", {"grp": {"k": 7}, "other": {"z": 1}}) as run:
        run.log_metrics({"heldout_ppl": 12.5})
        run.set_tags({"runtime.dtype": "float32", "runtime.threads": 2, "runtime.cpu": "Test CPU"})
    found = lineage.find_run(store, "heldout_ppl")
    assert found.info.run_id == run.run_id
    text = lineage.describe(store, found, "heldout_ppl")
    assert "heldout_ppl = 12.5" in text and "grp.k = 7" in text and "other.z" not in text  # only the stage's params
    assert "runtime  cpu Test CPU, dtype float32, threads 2" in text  # what the bits depend on, besides code
    assert lineage.find_run(store, "no_such_metric") is None


def test_pipeline_stages_expands_foreach(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("ev:\n  variants:\n    dense: x\n    flexi: y\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  prep:\n    cmd: a\n  evaluate:\n    foreach: ${ev.variants}\n"
                                       "    do:\n      cmd: b\n")
    assert lineage.pipeline_stages() == ["prep", "evaluate@dense", "evaluate@flexi"]


def test_experiment_workspaces_write_to_their_projects_store(tmp_path, monkeypatch):
    """`dvc exp run --queue/--temp` run in <project>/.dvc/tmp/exps/[standalone/]<tmp>, which DVC deletes."""
    from flexigpt.track.uri import owning_project, tracking_uri

    monkeypatch.delenv("FLEXIGPT_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "proj"
    for ws in (project / ".dvc/tmp/exps/tmpab12", project / ".dvc/tmp/exps/standalone/tmpcd34"):
        ws.mkdir(parents=True)
        assert owning_project(ws) == project.resolve()
        assert tracking_uri(ws) == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert tracking_uri(project) == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert owning_project(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()

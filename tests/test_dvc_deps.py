"""dvc.yaml declares, for every stage, every project file the stage runs; and dvc.lock has no stray stages.

The closure is stricter than ``../shared/tools/deps_closure.py``: it follows imports inside functions
too (a stage that calls a function runs the modules that function imports), and the sibling modules
of ``stages/`` (``_env.py``).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = "flexigpt"


def _module_file(mod: str) -> Path | None:
    base = ROOT.joinpath(*mod.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _imports(path: Path) -> set[Path]:
    """Project files that ``path`` imports anywhere (module level or inside functions)."""
    rel = path.relative_to(ROOT)
    pkg_parts = list(rel.parent.parts)
    out: set[Path] = set()

    def add(mod: str) -> None:
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
            if f := _module_file(".".join(parts[:i])):
                out.add(f)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PKG:
                    add(a.name)
                elif rel.parts[0] == "stages" and (ROOT / "stages" / f"{a.name}.py").is_file():
                    out.add(ROOT / "stages" / f"{a.name}.py")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] != PKG:
                continue
            add(mod)
            for a in node.names:  # `from pkg import module`
                if f := _module_file(f"{mod}.{a.name}"):
                    out.add(f)
    return out


def closure(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(_imports(f) - seen)
    return {f.relative_to(ROOT).as_posix() for f in seen}


def stage_code() -> dict[str, tuple[set[str], list[str]]]:
    """stage -> (project files it runs, its deps entries)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        body = st.get("do", st)
        scripts = [s for s in re.findall(r"[\w./-]+\.py", body["cmd"]) if (ROOT / s).is_file()]
        assert scripts, f"stage {name}: no script found in cmd {body['cmd']!r}"
        need = set().union(*(closure(ROOT / s) for s in scripts))
        deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
        out[name] = (need, deps)
    return out


def write_code_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's run of code deps (``- flexigpt/...py`` / ``- stages/...py`` lines) from the imports."""
    code = {name: sorted(need, key=lambda f: (not f.startswith("stages/"), f)) for name, (need, _) in stage_code().items()}
    out, stage = [], None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^  ([\w@]+):\s*$", line):
            stage = m.group(1)
        if re.match(r"^\s+- (flexigpt|stages)/[\w/]+\.py$", line):
            indent = line[: line.index("-")]
            while i < len(lines) and re.match(r"^\s+- (flexigpt|stages)/[\w/]+\.py$", lines[i]):
                i += 1
            out += [f"{indent}- {f}" for f in code[stage]]
            continue
        out.append(line)
        i += 1
    path.write_text("\n".join(out) + "\n")


def _covered(f: str, deps: list[str]) -> bool:
    return any(f == d.rstrip("/") or f.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_depends_on_all_code_it_runs():
    report, missing = [], {}
    for name, (need, deps) in stage_code().items():
        gaps = sorted(f for f in need if not _covered(f, deps))
        report.append(f"{name}: {len(need)} files, {len(gaps)} missing")
        if gaps:
            missing[name] = gaps
    print("\n".join(report))
    assert not missing, "run `python tests/test_dvc_deps.py --write`, or add to the stages' deps in dvc.yaml:\n" + "\n".join(
        f"  {k}:\n" + "".join(f"      - {f}\n" for f in v) for k, v in missing.items())


def test_code_deps_are_not_stale():
    """A listed .py dep that the stage no longer runs would rerun it for nothing: keep the lists exact."""
    extra = {}
    for name, (need, deps) in stage_code().items():
        py = [d for d in deps if d.endswith(".py")]
        if stale := sorted(set(py) - need):
            extra[name] = stale
    assert not extra, f"deps the stages do not run (`python tests/test_dvc_deps.py --write` removes them): {extra}"


def test_closure_sees_function_level_imports(tmp_path):
    """The check must fail on a miss: a function-level import of a module is part of the closure."""
    need = closure(ROOT / "stages" / "evaluate.py")
    # lineage.py is reached only through imports inside functions (stage_main -> tracking -> lineage)
    assert {"flexigpt/track/lineage.py", "flexigpt/devices.py", "stages/_env.py", "flexigpt/__init__.py"} <= need
    assert "flexigpt/compress/importance.py" not in need  # evaluation runs no compression code
    assert not _covered("flexigpt/track/lineage.py", ["flexigpt/track/tracking.py", "stages/evaluate.py"])
    assert _covered("flexigpt/track/lineage.py", ["flexigpt"])


def test_lock_holds_only_stages_of_dvc_yaml():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = set()
    for name, st in stages.items():
        if "foreach" in st:
            names |= {f"{name}@{k}" for k in params["evaluate"]["variants"]}
        else:
            names.add(name)
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert set(lock) <= names, f"dvc.lock has stages dvc.yaml does not: {sorted(set(lock) - names)}"


# Stages DVC may rerun instead of restoring from the run-cache: `compare` keeps `reports/` git-tracked
# (`cache: false`, read in the README) and takes seconds.
NOT_RUN_CACHED = {"compare"}


def test_stages_can_be_restored_from_the_run_cache():
    """DVC (3.x ``Stage.run``) saves no run-cache entry for a stage with an uncached output that is not a
    metric or plot, so every study experiment would rerun it: evaluate@<variant> did, at ~4 min each."""
    from dvc.repo import Repo

    blocked = {}
    with Repo(str(ROOT)) as repo:
        for st in repo.index.stages:
            why = [o.def_path for o in st.outs if not o.use_cache and not (o.is_metric or o.is_plot)]
            why += [f"{o.def_path} (persist)" for o in st.outs if o.persist]
            why += ["always_changed"] if st.always_changed else []
            if why and st.addressing not in NOT_RUN_CACHED:
                blocked[st.addressing] = why
    assert not blocked, f"stages DVC's run-cache cannot restore (make these outputs cached): {blocked}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        write_code_deps()
        print("dvc.yaml: code deps rewritten from the imports")

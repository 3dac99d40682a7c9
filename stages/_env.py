"""Imported first by every stage script: run the project's own code, or say in one line what to run.

* The stage imports ``flexigpt`` from the folder beside ``stages/``, not from wherever the package
  happens to be installed: in a ``dvc exp run --temp`` / ``--queue`` workspace that is the copy DVC
  hashed, while an editable install would point back at the (possibly since edited) main checkout.
* DVC runs each stage's ``python stages/<name>.py`` with whatever ``python`` comes first on PATH.
  Outside the project's virtual environment that is usually a Python without torch or flexigpt's
  other dependencies, and the user would get a traceback instead of the command that fixes it.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "flexigpt" / "__init__.py").is_file():
    sys.path.insert(0, str(ROOT))

try:
    import flexigpt.pipeline.stagekit  # noqa: F401  (pulls in torch and the rest of the runtime)
except ImportError as e:
    sys.exit(f"error: {sys.executable} cannot import flexigpt's runtime ({e}).\n"
             "  fix: run `make repro` (it sets up .venv and uses it), or `make setup && source .venv/bin/activate` "
             "before `dvc repro` / `dvc exp run`")

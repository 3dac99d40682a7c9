"""The whole params.yaml schema: every section's settings class, checked in one call.

``flexigpt check`` (and the tests) run :func:`check`; each stage builds only the sections it reads,
so a stage's code deps stay its own.
"""
from __future__ import annotations

from flexigpt.compress.importance import ImportanceSettings
from flexigpt.compress.plan import PruneSettings
from flexigpt.config import DataSettings, Params, Settings
from flexigpt.data.splits import CalibrationSettings, HeldoutSettings
from flexigpt.devices import ComputeSettings
from flexigpt.errors import FlexiError
from flexigpt.evaluate.suite import EvaluateSettings
from flexigpt.model.importer import ModelSettings
from flexigpt.model.stream import StreamSettings
from flexigpt.pipeline.stagekit import PathSettings
from flexigpt.train import TrainLaunchSettings, TrainSettings
from flexigpt.variants import AdapterSettings, BaselineSettings, ExtendSettings, NormSettings, Recipe, SvdInitSettings

SETTINGS: tuple[type[Settings], ...] = (
    DataSettings, ComputeSettings, ModelSettings, CalibrationSettings, HeldoutSettings, PathSettings,
    ImportanceSettings, PruneSettings, StreamSettings, AdapterSettings, BaselineSettings, NormSettings, ExtendSettings, SvdInitSettings,
    TrainSettings, TrainLaunchSettings, EvaluateSettings)
TOP_LEVEL = ("mode",)


def check(params: Params) -> dict[str, Settings]:
    """Build every section (raising :class:`FlexiError` on the first bad key); unknown sections refused."""
    known = {c.SECTION for c in SETTINGS} | set(TOP_LEVEL)
    for key in params.data:
        if key not in known:
            raise FlexiError(key, "is not a params.yaml section", f"remove it; sections are: {', '.join(sorted(known))}")
    out: dict[str, Settings] = {c.SECTION: c.from_params(params) for c in SETTINGS}
    Recipe.from_params(params)  # mode and training seed
    return out

"""User-facing errors: each names the offending param and the fix."""
from __future__ import annotations


class FlexiError(Exception):
    """A bad param or input, reported without a traceback.

    ``param`` is the dotted params.yaml key (or the input) at fault; ``fix`` says what to do.
    """

    def __init__(self, param: str, problem: str, fix: str) -> None:
        self.param, self.problem, self.fix = param, problem, fix
        super().__init__(f"{param}: {problem}\n  fix: {fix}")


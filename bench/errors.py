"""The one exception type users see: a leaf module, so every other module can raise it without import cycles."""


class BenchError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero (2 for bad input)."""


class RunFailed(BenchError):
    """The run produced a value that makes it meaningless (a NaN/inf loss, non-finite samples, an
    impossible metric); the runner records it in failed.json instead of a row."""

    def __init__(self, stage: str, step: int | None, reason: str):
        self.stage, self.step, self.reason = stage, step, reason
        where = f"{stage} step {step}" if step is not None else stage
        super().__init__(f"{reason} (at {where})")

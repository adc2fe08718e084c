"""Why a submission was refused, or stored but not queued: one exception per reason.

The API maps them to status codes (``scheduler.api``), the CLI to exit messages; every
module of submission (expansion, options, path text) raises these and nothing else.
"""

from __future__ import annotations

__all__ = [
    "DispatchError",
    "ExpansionTimeoutError",
    "InvalidInputError",
    "InvalidOptionsError",
    "NoInputsError",
    "NoProductionModelError",
    "SubmissionError",
    "TooManyInputsError",
]


class SubmissionError(ValueError):
    """A submission was refused before anything was stored."""


class InvalidInputError(SubmissionError):
    """An input string cannot be a path (empty, NUL byte, too long, unreadable list file)."""


class NoInputsError(SubmissionError):
    """The inputs expanded to no file at all: a job without items would never finish."""


class TooManyInputsError(SubmissionError):
    """More items than ``settings.max_paths_per_job``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"too many inputs: a job takes at most {limit} paths (settings.max_paths_per_job); "
            "split the submission into several jobs"
        )


class InvalidOptionsError(SubmissionError):
    """Training/evaluation options failed validation; the message names the option."""


class NoProductionModelError(SubmissionError):
    """Classify without ``model_version_id`` needs a production model."""

    def __init__(self) -> None:
        super().__init__(
            "no production model: promote one with `mriq models promote ID` "
            "(or POST /models/{id}/promote), or pass a model version explicitly (--model)"
        )


class ExpansionTimeoutError(SubmissionError):
    """Expanding the inputs took longer than ``settings.expansion_time_limit``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(
            f"expanding the inputs took longer than {seconds:g} s "
            "(settings.expansion_time_limit): name fewer folders or narrower patterns, "
            "or submit a list file"
        )


class DispatchError(RuntimeError):
    """The job was stored but could not be handed to the broker; it has been marked failed.

    ``reason`` is the broker's error (for operators: it names the broker's address);
    ``public_message`` leaves it out, for API clients.
    """

    def __init__(self, job_id: int, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(
            f"job {job_id} not queued: the broker is unreachable ({reason}); the job is marked "
            "failed, submit it again once the broker is back"
        )

    @property
    def public_message(self) -> str:
        return (
            f"job {self.job_id} not queued: the task broker is unavailable; the job is marked "
            "failed, submit it again later"
        )

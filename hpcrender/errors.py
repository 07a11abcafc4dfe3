"""One exception type per kind of user-facing failure, each mapped to the contract's exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 3


class HpcrenderError(Exception):
    """Base: a failure with a one-line message meant for the user."""

    exit_code = EXIT_JOB_FAILED


class BadInput(HpcrenderError):
    """Bad manifest or arguments: nothing was rendered."""

    exit_code = EXIT_BAD_INPUT


class ManifestError(BadInput):
    """A manifest with problems; holds every problem, one `FILE:LINE: key: problem` line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelNotFound(BadInput):
    """A model reference that names nothing loadable (no folder, file, builtin or cached hub id)."""


class DoesNotFit(BadInput):
    """A layout that cannot work: too few rows for the ranks, a world that does not divide into groups."""


class Interrupted(HpcrenderError):
    """Stopped by a signal after a checkpoint; running the same command again resumes."""

    exit_code = EXIT_INTERRUPTED

"""Errors of the lakehouse pipeline: one base class, narrow subclasses, messages that name the culprit."""

from __future__ import annotations


class LakehouseError(Exception):
    """Base of every error the pipeline raises on purpose; its message is one clear sentence."""

    retryable = False


class UsageError(LakehouseError):
    """A command was called with arguments that cannot work."""


class MissingDatasetError(LakehouseError):
    """A batch cannot start: a dataset has no CSV file in ``raw/``."""


class InputFileError(LakehouseError):
    """A raw file cannot be read at all (not UTF-8, changed since the snapshot, unreadable)."""


class BatchLockedError(LakehouseError):
    """Another run holds the root's batch lock."""

    retryable = True


class StorageError(LakehouseError):
    """Object I/O failed (list, read, write, copy or delete)."""

    retryable = True


class CommitConflictError(LakehouseError):
    """Another writer committed to the same Delta table first; the step is safe to retry."""

    retryable = True


class StepError(LakehouseError):
    """A batch step failed; the message names the step and the cause."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        self.retryable = getattr(cause, "retryable", False)
        super().__init__(f"step {step} failed: {describe(cause)}")


class CheckFailedError(LakehouseError):
    """A post-load check failed (an empty table)."""


def describe(error: BaseException) -> str:
    """One line for an error: its message, or its type when it has none."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, LakehouseError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__

"""Exceptions raised by collapsediag. Each names the record or module it is about."""
from __future__ import annotations


class CollapseDiagError(Exception):
    """Base class of every collapsediag error."""


class HParamError(CollapseDiagError, ValueError):
    """A hyper-parameter value an editor cannot use (raised when the editor is made, before any edit)."""


class RecordError(CollapseDiagError, ValueError):
    """A fact record is malformed (missing field, empty target, subject not in prompt, ...)."""

    def __init__(self, record_id: object, reason: str) -> None:
        self.record_id = record_id
        self.reason = reason
        super().__init__(f"record {record_id!r}: {reason}")


class EditError(CollapseDiagError, RuntimeError):
    """An edit could not be computed (non-finite values, singular solve, tokenisation)."""

    def __init__(self, record_id: object, reason: str) -> None:
        self.record_id = record_id
        self.reason = reason
        super().__init__(f"edit of record {record_id!r} failed: {reason}")


class ModelNotFoundError(CollapseDiagError, FileNotFoundError):
    """The requested model (or the embedded model's wheel) is not available."""


class ModeError(CollapseDiagError):
    """An editing mode the editor cannot run (e.g. ROME or r-ROME asked for a batch)."""


class TaskError(CollapseDiagError, ValueError):
    """A downstream task cannot be scored: unknown name, bad spec, or a record it cannot use."""

    def __init__(self, task: str, reason: str, record: object = None) -> None:
        self.task, self.reason, self.record = task, reason, record
        where = f" record {record}" if record is not None else ""
        super().__init__(f"downstream task {task!r}{where}: {reason}")

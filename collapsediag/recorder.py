"""The one way diagnostics leave an editor: ``rec.log(layer=..., name=value, ...)``."""
from __future__ import annotations

from typing import Any


class Recorder:
    """Collects per-layer and per-edit metrics of the edit in flight."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, Any]] = {}
        self.edit: dict[str, Any] = {}

    def log(self, layer: int | None = None, **metrics: Any) -> None:
        """Record metrics for ``layer`` (or for the edit as a whole when layer is None).

        A callable value is called here, so work done only for a diagnostic is skipped when diagnostics
        are off (``NullRecorder``).
        """
        metrics = {k: v() if callable(v) else v for k, v in metrics.items()}
        if layer is None:
            self.edit.update(metrics)
        else:
            self.layers.setdefault(int(layer), {}).update(metrics)

    def pop(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """Return and clear what was recorded."""
        edit, layers = self.edit, self.layers
        self.edit, self.layers = {}, {}
        return edit, layers


class NullRecorder(Recorder):
    """Discards everything (diagnostics off)."""

    def log(self, layer: int | None = None, **metrics: Any) -> None:  # noqa: D102
        return None

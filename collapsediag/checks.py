"""Input checks that run before a model loads, so a bad input fails in seconds with a clear message."""
from __future__ import annotations

import logging
from typing import Any

from .errors import CollapseDiagError, RecordError
from .requests import EditRequest

log = logging.getLogger("collapsediag")


def check_records(records: list[dict[str, Any]], spec: str, warn: bool = True) -> list[dict[str, Any]]:
    """Raise if ``records`` is empty or holds no valid record; warn once for each rejected record (``warn``).

    Rejected records stay in the list: a run records each one's error in its ``status``.
    """
    if not records:
        raise CollapseDiagError(f"data set {spec!r} holds no records")
    bad = []
    for i, rec in enumerate(records):
        try:
            EditRequest.from_dict(rec, case_id=rec.get("case_id", i) if isinstance(rec, dict) else i)
        except RecordError as exc:
            bad.append(exc)
            if warn:
                log.warning("rejected %s", exc)
    if len(bad) == len(records):
        raise CollapseDiagError(f"data set {spec!r} holds no valid record ({len(records)} rejected; "
                                f"first: {bad[0]})")
    return records


def check_layers(layers: list[int], n_layers: int, model: str) -> None:
    """Raise if a layer index is outside the model's ``n_layers`` decoder blocks."""
    outside = [layer for layer in layers if not 0 <= layer < n_layers]
    if outside:
        raise CollapseDiagError(f"layer {outside[0]} is outside model {model!r}, which has {n_layers} layers "
                                f"(0 to {n_layers - 1})")

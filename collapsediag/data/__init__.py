"""Fact sets: CounterFact (ROME schema), plain JSONL facts, and the project's own fact set.

Loaders return flat records (dicts); ``EditRequest.from_dict`` validates each one when it is
edited, so a malformed record is reported with its id and the run goes on.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from ..errors import CollapseDiagError

OWN_FACTS = pathlib.Path(__file__).parent / "facts.jsonl"


def flatten_counterfact(rec: Any, position: int) -> dict[str, Any]:
    """One ROME-schema CounterFact case as a flat record (missing parts stay missing)."""
    if not isinstance(rec, dict):
        return {"case_id": position, "_error": f"record is a {type(rec).__name__}, not an object"}
    rr = rec.get("requested_rewrite")
    flat: dict[str, Any] = {"case_id": rec.get("case_id", position)}
    if not isinstance(rr, dict):
        flat["_error"] = "missing field 'requested_rewrite'"
        return flat
    for key in ("subject", "prompt", "target_new", "target_true"):
        if key in rr:
            flat[key] = rr[key]
    flat["paraphrase_prompts"] = rec.get("paraphrase_prompts") or []
    flat["neighborhood_prompts"] = rec.get("neighborhood_prompts") or []
    return flat


def load_counterfact(path: str | os.PathLike, n: int | None = None) -> list[dict[str, Any]]:
    """CounterFact in the ROME schema (``counterfact.json``: a JSON list of cases)."""
    data = _read_json_list(path)
    return [flatten_counterfact(r, i) for i, r in enumerate(data[:n] if n else data)]


def load_facts(path: str | os.PathLike, n: int | None = None) -> list[dict[str, Any]]:
    """A plain facts file: JSON Lines with subject, prompt ({} for the subject), target_new, ..."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise CollapseDiagError(f"facts file {p} does not exist")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            rec = {"_error": f"line {i + 1} is not JSON: {exc.msg}"}
        if not isinstance(rec, dict):
            rec = {"_error": f"line {i + 1} is not an object"}
        rec.setdefault("case_id", f"{p.name}:{i + 1}")
        out.append(rec)
        if n and len(out) >= n:
            break
    return out


def own_facts(n: int | None = None) -> list[dict[str, Any]]:
    """The project's own fact set, written for and checked on the embedded model."""
    return load_facts(OWN_FACTS, n)


def load_data(spec: str, n: int | None = None) -> list[dict[str, Any]]:
    """Records from ``counterfact:PATH``, ``facts:PATH`` or ``own`` (the project's fact set)."""
    kind, _, path = spec.partition(":")
    if kind == "own" and not path:
        return own_facts(n)
    if not path:
        raise CollapseDiagError(f"data spec {spec!r}: expected counterfact:PATH, facts:PATH or own")
    if kind == "counterfact":
        return load_counterfact(path, n)
    if kind == "facts":
        return load_facts(path, n)
    raise CollapseDiagError(f"unknown data kind {kind!r} in {spec!r}: use counterfact, facts or own")


def _read_json_list(path: str | os.PathLike) -> list:
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise CollapseDiagError(f"data file {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CollapseDiagError(f"{p} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise CollapseDiagError(f"{p} must hold a JSON list of records")
    return data

"""Fact sets: CounterFact (ROME and EasyEdit/MEND schemas), zsRE (MEND eval schema), plain
facts files (JSON Lines or CSV) and the project's own fact set.

Loaders return flat records (dicts); ``EditRequest.from_dict`` validates each one when it is
edited, so a malformed record is reported with its id and the run goes on.
"""
from __future__ import annotations

import csv
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


def flatten_counterfact_mend(rec: Any, position: int) -> dict[str, Any]:
    """One CounterFact case in the reduced EasyEdit/MEND schema (the prompt has the subject written in)."""
    if not isinstance(rec, dict):
        return {"case_id": position, "_error": f"record is a {type(rec).__name__}, not an object"}
    flat: dict[str, Any] = {"case_id": rec.get("case_id", position)}
    for src, dst in (("subject", "subject"), ("prompt", "prompt_filled"), ("target_new", "target_new"),
                     ("ground_truth", "target_true")):
        if src in rec:
            flat[dst] = rec[src]
    flat["paraphrase_prompts"] = [rec["rephrase_prompt"]] if rec.get("rephrase_prompt") else []
    flat["neighborhood_prompts"] = [rec["locality_prompt"]] if rec.get("locality_prompt") else []
    return flat


def flatten_zsre(rec: Any, position: int) -> dict[str, Any]:
    """One zsRE case in the MEND eval schema: question ``src``, new answer ``alt``, gold ``answers``.

    The NQ locality pair (``loc``, ``loc_ans``) is kept under ``locality`` for later use.
    """
    if not isinstance(rec, dict):
        return {"case_id": position, "_error": f"record is a {type(rec).__name__}, not an object"}
    flat: dict[str, Any] = {"case_id": rec.get("case_id", position)}
    if "subject" in rec:
        flat["subject"] = rec["subject"]
    if "src" in rec:
        flat["prompt_filled"] = rec["src"]
    if "alt" in rec:
        flat["target_new"] = rec["alt"]
    answers = rec.get("answers")
    if isinstance(answers, list) and answers:
        flat["target_true"] = answers[0]
    flat["paraphrase_prompts"] = [rec["rephrase"]] if rec.get("rephrase") else []
    if rec.get("loc"):
        flat["locality"] = {"prompt": rec["loc"], "answer": rec.get("loc_ans")}
    return flat


def load_counterfact(path: str | os.PathLike, n: int | None = None) -> list[dict[str, Any]]:
    """CounterFact from a JSON list, in the ROME schema or the reduced EasyEdit/MEND schema (detected)."""
    data = _read_json_list(path)
    data = data[:n] if n else data
    mend = any(isinstance(r, dict) and "ground_truth" in r and "requested_rewrite" not in r for r in data[:20])
    flatten = flatten_counterfact_mend if mend else flatten_counterfact
    return [flatten(r, i) for i, r in enumerate(data)]


def load_zsre(path: str | os.PathLike, n: int | None = None) -> list[dict[str, Any]]:
    """zsRE in the MEND eval schema (``zsre_mem_eval.json``: a JSON list)."""
    data = _read_json_list(path)
    return [flatten_zsre(r, i) for i, r in enumerate(data[:n] if n else data)]


def load_csv_facts(path: str | os.PathLike, n: int | None = None) -> list[dict[str, Any]]:
    """A CSV facts file: columns subject, prompt, target_new[, target_true, paraphrase_prompts,
    neighborhood_prompts]; list columns hold a JSON list or items separated by ``|``."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise CollapseDiagError(f"facts file {p} does not exist")
    out: list[dict[str, Any]] = []
    with open(p, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            rec: dict[str, Any] = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            if None in row:
                rec["_error"] = f"row {i + 2} has more fields than the header"
            for key in ("paraphrase_prompts", "neighborhood_prompts"):
                if key in rec:
                    rec[key] = _split_list(rec[key])
            rec.setdefault("case_id", f"{p.name}:{i + 2}")
            out.append(rec)
            if n and len(out) >= n:
                break
    return out


def _split_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
            return [str(x) for x in items]
        except json.JSONDecodeError:
            pass
    return [x.strip() for x in value.split("|") if x.strip()]


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
    """Records from ``counterfact:PATH``, ``zsre:PATH``, ``facts:PATH`` (.jsonl or .csv) or ``own``."""
    if n is not None and n < 1:
        raise CollapseDiagError(f"the number of records must be at least 1, got {n} (None means all)")
    kind, _, path = spec.partition(":")
    if kind == "own" and not path:
        return own_facts(n)
    if not path:
        raise CollapseDiagError(f"data spec {spec!r}: expected counterfact:PATH, zsre:PATH, facts:PATH or own")
    if kind == "counterfact":
        return load_counterfact(path, n)
    if kind == "zsre":
        return load_zsre(path, n)
    if kind == "facts":
        return load_csv_facts(path, n) if path.lower().endswith(".csv") else load_facts(path, n)
    raise CollapseDiagError(f"unknown data kind {kind!r} in {spec!r}: use counterfact, zsre, facts or own")


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

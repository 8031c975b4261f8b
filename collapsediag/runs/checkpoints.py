"""Checkpoints of a run: re-test a bounded sample of earlier edits, measure perplexity and generation entropy.

The cost of a checkpoint does not grow with the run: it re-tests every edit made since the previous
checkpoint plus at most ``sample`` older ones, drawn with a generator seeded by the run's seed and the
checkpoint's index (so a resumed run draws the same sample).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..requests import EditRequest
    from .session import EditSession

DEFAULT_SAMPLE = 200


def retention_sample(done: list[int], since: int, sample: int, seed: int, checkpoint: int) -> tuple[list[int], set[int]]:
    """The edits a checkpoint re-tests, ascending, and which of them are recent.

    done: successful edit indices; since: edit index of the previous checkpoint (−1 for none);
    sample: most older edits to draw (0 = all). Every edit after ``since`` is tested.
    """
    if sample < 0:
        raise ValueError(f"retention sample must be 0 or more, got {sample}")
    recent = [i for i in done if i > since]
    older = [i for i in done if i <= since]
    if sample and len(older) > sample:
        rng = np.random.default_rng([int(seed), int(checkpoint) + 1])
        older = sorted(int(i) for i in rng.choice(older, size=sample, replace=False))
    return sorted(older + recent), set(recent)


def scored_prompts(requests: list["EditRequest"]) -> tuple[list[str], list[str], list[int], list[str]]:
    """What a checkpoint scores: every rewrite, paraphrase and neighborhood prompt of the requests that have a
    true target, each twice in a row (with target_new, then target_true); per prompt, the position of its
    request in ``requests`` and its kind."""
    prompts, targets, owner, kinds = [], [], [], []
    for j, r in enumerate(requests):
        if not r.target_true:
            continue
        for kind, texts in (("rewrite", [r.text]), ("paraphrase", r.paraphrase_prompts),
                            ("neighborhood", r.neighborhood_prompts)):
            for t in texts:
                t = t.format(r.subject) if "{}" in t else t
                prompts += [t, t]
                targets += [r.target_new, r.target_true]
                owner.append(j)
                kinds.append(kind)
    return prompts, targets, owner, kinds


def _scores(session: "EditSession", tested: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """p(target_new), p(target_true) of every rewrite/paraphrase/neighborhood prompt of the tested edits, with
    the position of each prompt's edit in ``tested`` and its kind."""
    from ..signals.evaluate import target_probs

    prompts, targets, owner, kinds = scored_prompts([session.requests[i] for i in tested])
    p = target_probs(session.model, session.tok, prompts, targets) if prompts else np.empty(0)
    return p[0::2], p[1::2], np.array(owner, dtype=int), np.array(kinds)


def run_checkpoint(session: "EditSession") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``evals`` row and the ``retention`` rows of a checkpoint after the session's last edit."""
    from ..signals.evaluate import success_share
    from ..signals.fluency import generation_entropy, perplexity

    t0 = time.perf_counter()
    index = session.n_edits - 1
    since = session.checkpoints[-1] if session.checkpoints else -1
    done = [i for i in session.requests if session.edits[i]["status"] == "ok"]
    tested, recent = retention_sample(sorted(done), since, session.retention_sample, session.env.seed, index)
    p_new, p_true, owner, kinds = _scores(session, tested)
    retention_rows, per_kind = [], {"rewrite": [], "paraphrase": [], "neighborhood": []}
    still_ok = []
    for j, i in enumerate(tested):
        for kind in per_kind:
            sel = (owner == j) & (kinds == kind)
            if sel.any():
                per_kind[kind].append(success_share(p_new[sel], p_true[sel], kind != "neighborhood"))
        sel = (owner == j) & (kinds == "rewrite")
        if sel.any():
            k = int(np.flatnonzero(sel)[0])
            success = bool(p_new[k] > p_true[k])
            retention_rows.append({"checkpoint": index, "edit_index": i, "case_id": session.edits[i]["case_id"],
                                   "p_new": float(p_new[k]), "p_true": float(p_true[k]), "success": success,
                                   "recent": i in recent})
            if session.edits[i].get("efficacy"):
                still_ok.append(success)
    row = {"edit_index": index, "n_edits": session.n_edits, "n_retention": len(retention_rows),
           "n_done": len(done), "retention": float(np.mean(still_ok)) if still_ok else float("nan"),
           "efficacy": _mean(per_kind["rewrite"]), "paraphrase_score": _mean(per_kind["paraphrase"]),
           "neighborhood_score": _mean(per_kind["neighborhood"]),
           "perplexity": perplexity(session.model, session.tok, session.eval_texts)
           if session.eval_texts else float("nan"),
           "generation_entropy": generation_entropy(session.model, session.tok, session.generation_prompts,
                                                    session.generation_tokens, seed=session.env.seed + index)
           if session.generation_prompts else float("nan")}
    row["seconds"] = time.perf_counter() - t0
    return row, retention_rows


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def downstream_rows(session: "EditSession") -> list[dict[str, Any]]:
    """The ``downstream`` rows of a checkpoint after the session's last edit (none without a suite)."""
    if session.downstream is None:
        return []
    return session.downstream.score(session.model, session.tok, session.n_edits - 1)

"""Scoring downstream tasks: answer-word log-probabilities, the metrics, and which tasks tell anything.

Each scored example's prompt (``Task.prompts``) is followed in turn by every answer word; the prediction is
the answer whose tokens have the largest summed log-probability (ties: the first in the spec). One forward
serves every single-token answer of a prompt; the forwards are sorted by length and batched
(``evaluate.continuation_logprobs``). The prompts' common token prefix (the demonstrations) runs once per task
per call; each prompt then runs only its own tokens over that prefix's keys and values.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .downstream import DEFAULT_N, Task, TaskSpec, file_sha256, task_from_spec
from ..errors import TaskError
from ..tokens import encode

if TYPE_CHECKING:
    from torch import nn

    from ..runs.store import Run

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    """Share of predictions equal to the gold answers (NaN if empty)."""
    return float(np.mean(np.asarray(pred) == np.asarray(gold))) if len(gold) else float("nan")


def f1_score(pred: np.ndarray, gold: np.ndarray, positive: int) -> float:
    """F1 of the class ``positive``: 2TP / (2TP + FP + FN); 0 when there is no positive at all."""
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp, fp, fn = int(np.sum(pred & gold)), int(np.sum(pred & ~gold)), int(np.sum(~pred & gold))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (multi-class form, equal to the binary φ for two classes); 0 when undefined."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.union1d(pred, gold)
    t = np.array([np.sum(gold == c) for c in classes], dtype=float)
    p = np.array([np.sum(pred == c) for c in classes], dtype=float)
    s, c = float(len(gold)), float(np.sum(pred == gold))
    den = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / den) if den else 0.0


def wilson_interval(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share (e.g. an accuracy) of ``n`` trials (95 % by default); NaNs if n is 0."""
    if not n or not np.isfinite(share):
        return float("nan"), float("nan")
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_level(gold: np.ndarray, n_answers: int) -> float:
    """Accuracy without looking at the input: always answering the most common gold answer (1/n_answers for a
    balanced subset)."""
    gold = np.asarray(gold)
    return float(np.bincount(gold, minlength=n_answers).max() / len(gold)) if len(gold) else 1.0 / n_answers


def is_informative(accuracy: float, n: int, chance: float) -> bool:
    """Whether the 95 % interval of ``accuracy`` over ``n`` examples excludes ``chance``."""
    lo, hi = wilson_interval(accuracy, n)
    return bool(np.isfinite(lo) and not lo <= chance <= hi)


def max_length(model: "nn.Module") -> int | None:
    """The longest sequence the model takes (None when its config does not say)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


MIN_PREFIX = 8  # shortest shared prompt prefix worth its own forward


def _encode(task: Task, tok: object, limit: int | None) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """``encoded`` and, per pair, whether its prompt was cut."""
    answers = [list(tok(w, add_special_tokens=False)["input_ids"]) for w in task.spec.answers.values()]
    if any(not a for a in answers):
        raise TaskError(task.name, "an answer word encodes to no token")
    contexts, conts, cut = [], [], []
    for text in task.prompts():
        ids = encode(tok, text)
        for a in answers:
            keep = len(ids) if limit is None else max(1, limit - len(a) + 1)
            contexts.append(ids[-keep:])
            conts.append(a)
            cut.append(keep < len(ids))
    return contexts, conts, cut


def encoded(task: Task, tok: object, limit: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """Per (scored example, answer), example-major: the prompt's token ids (cut from the left so that prompt and
    answer fit in ``limit``) and the answer's."""
    contexts, conts, _ = _encode(task, tok, limit)
    return contexts, conts


def shared_prefix(contexts: list[list[int]], cut: list[bool] | None = None) -> list[int]:
    """The longest token prefix of every prompt not cut (a token boundary of each full tokenisation, so the
    split changes no token), one token short of the shortest such prompt; [] when under ``MIN_PREFIX``
    tokens or when fewer than two distinct prompts are whole."""
    whole = [c for i, c in enumerate(contexts) if not (cut and cut[i])]
    if len({tuple(c) for c in whole}) < 2:
        return []
    n = min(len(c) for c in whole) - 1
    first = whole[0]
    for c in whole[1:]:
        k = 0
        while k < n and c[k] == first[k]:
            k += 1
        n = k
    return list(first[:n]) if n >= MIN_PREFIX else []


def token_counts(task: Task, tok: object, limit: int | None = None) -> dict[str, float]:
    """Tokens run per scored example: ``full`` (every distinct teacher-forced sequence whole) and ``shared``
    (the shared prefix once per task, spread over the examples, plus each sequence's own tokens)."""
    contexts, conts, cut = _encode(task, tok, limit)
    prefix = shared_prefix(contexts, cut)
    p = len(prefix)
    seqs = {tuple(c + a[:-1]): len(c) > p and c[:p] == prefix for c, a in zip(contexts, conts)}
    n = len(task.scored)
    full = sum(len(q) for q in seqs)
    own = sum(len(q) - p if ok else len(q) for q, ok in seqs.items())
    return {"prefix": p, "full": full / n, "shared": (own + (p if any(seqs.values()) else 0)) / n}


def answer_logprobs(model: "nn.Module", tok: object, task: Task, batch_size: int = 16,
                    share_prefix: bool = True) -> np.ndarray:
    """[n scored, n answers]: summed log-probability of each answer word after each scored prompt. With
    ``share_prefix`` the prompts' common start (the demonstrations) runs once and its keys and values serve
    every prompt (``evaluate.continuation_logprobs``); cut prompts and families whose cache cannot serve take
    the full forward."""
    from .evaluate import continuation_logprobs

    contexts, conts, cut = _encode(task, tok, max_length(model))
    prefix = shared_prefix(contexts, cut) if share_prefix else None
    lp = continuation_logprobs(model, tok, contexts, conts, batch_size, prefix=prefix or None)
    return lp.astype(float).reshape(len(task.scored), len(task.spec.answers))


def score_task(model: "nn.Module", tok: object, task: Task, batch_size: int = 16) -> dict[str, Any]:
    """One ``downstream`` row's numbers for a task on the model as it is: n, accuracy, f1 and mcc (NaN where
    the spec does not ask for them), chance and seconds."""
    t0 = time.perf_counter()
    pred = answer_logprobs(model, tok, task, batch_size).argmax(axis=1)
    gold = task.gold()
    out = {"task": task.name, "n": len(gold), "accuracy": accuracy(pred, gold), "f1": float("nan"),
           "mcc": float("nan"), "chance": chance_level(gold, len(task.labels))}
    if "f1" in task.spec.metrics:
        out["f1"] = f1_score(pred, gold, task.labels.index(task.spec.positive))
    if "mcc" in task.spec.metrics:
        out["mcc"] = matthews(pred, gold)
    out["seconds"] = time.perf_counter() - t0
    return out


class DownstreamSuite:
    """The tasks a run scores at every checkpoint, with their subsets fixed for the whole run."""

    def __init__(self, tasks: list[Task], n: int = DEFAULT_N, seed: int = 0, batch_size: int = 16) -> None:
        self.tasks, self.n, self.seed, self.batch_size = list(tasks), int(n), int(seed), int(batch_size)

    def score(self, model: "nn.Module", tok: object, edit_index: int) -> list[dict[str, Any]]:
        """The ``downstream`` rows of one checkpoint after ``edit_index`` (−1: the unedited model)."""
        return [{"edit_index": int(edit_index), **score_task(model, tok, t, self.batch_size)} for t in self.tasks]

    def config(self) -> dict[str, Any]:
        """What a run records to score the same examples again on resume (``from_config``)."""
        return {"n": self.n, "seed": self.seed, "batch_size": self.batch_size,
                "tasks": [{"name": t.name, "spec": t.spec.to_dict(), "data": str(t.path),
                           "sha256": file_sha256(t.path)} for t in self.tasks]}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "DownstreamSuite":
        """The suite a run recorded; its data files must be unchanged (same sha256)."""
        tasks = []
        for t in cfg["tasks"]:
            if file_sha256(t["data"]) != t["sha256"]:
                raise TaskError(t["name"], f"data file {t['data']} changed since the run started")
            tasks.append(task_from_spec(t["name"], TaskSpec.from_dict(t["spec"], t["name"]), t["data"],
                                        cfg["n"], cfg["seed"]))
        return cls(tasks, cfg["n"], cfg["seed"], cfg.get("batch_size", 16))


def downstream_summary(run: "Run") -> pd.DataFrame:
    """Per task of a run: the unedited accuracy (at edit −1, else the first checkpoint) with its 95 % Wilson
    interval, chance, whether the task is informative (interval excludes chance), the last checkpoint's
    accuracy, and ``dropped``: informative and the last accuracy below the unedited interval (None for an
    uninformative task, which never counts as dropped)."""
    cols = ["task", "n", "chance", "accuracy_unedited", "ci_low", "ci_high", "informative", "last_edit",
            "accuracy_last", "dropped"]
    d = run.downstream.dropna(subset=["edit_index", "accuracy"])
    rows = []
    for task, g in d.groupby("task", sort=False):
        g = g.sort_values("edit_index")
        first, last = g.iloc[0], g.iloc[-1]
        lo, hi = wilson_interval(float(first["accuracy"]), int(first["n"]))
        informative = is_informative(float(first["accuracy"]), int(first["n"]), float(first["chance"]))
        rows.append({"task": task, "n": int(first["n"]), "chance": float(first["chance"]),
                     "accuracy_unedited": float(first["accuracy"]), "ci_low": lo, "ci_high": hi,
                     "informative": informative, "last_edit": int(last["edit_index"]),
                     "accuracy_last": float(last["accuracy"]),
                     "dropped": bool(float(last["accuracy"]) < lo) if informative else None})
    return pd.DataFrame(rows, columns=cols)

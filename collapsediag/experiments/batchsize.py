"""Finding (iii) with the seed's protocol: the same N edits as batches of size B, in two arms.

* Arm A, batch editing: N/B independent batches, each applied to the unedited weights, scored right after it
  is applied, and undone before the next (a run in mode ``alone``: ``model_at(i)`` is W₀ plus i's batch).
* Arm B, sequential-batched: the batches accumulate; each is scored right after it is applied (the seed's
  measure), and all N edits are scored again at the end (one checkpoint re-testing every edit).
B = N is one batch: the same run serves both arms.

Each (ordering, arm, B) is a run under ``out/order<k>/arm<A|B>-b<B>``; ordering 0 is the records in file order,
ordering k a permutation of the same N records seeded with k. Every run of a study shares one target cache
(on disk under ``out/targets``): the batches of arm A and the first batch of arm B start from W₀, so their
targets are optimised once for every B and ordering. Runs resume: arm B from its saved state, arm A by
redoing an unfinished run (its targets come from the disk cache).

>>> runs = batch_arms(model, tok, records, "runs/iii/memit", Setup("memit", [3, 4, 5, 6, 7]), n=1024)
>>> arm_table(runs)                                   # per run: the scores after each batch and at the end
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..arch import arch_for, get_module, weight_matrix
from ..editors import get_editor
from ..editors.target import TargetCache
from ..errors import CollapseDiagError
from ..runs.session import EditSession
from ..runs.store import ALONE, Run, load_run
from ..stats import StatsCache, TextCorpus

SCORES = ("efficacy", "paraphrase_score", "neighborhood_score")


def ordering(n: int, k: int) -> np.ndarray:
    """Record positions of ordering ``k``: 0 is 0..n−1, k > 0 a permutation seeded with k."""
    return np.arange(n) if k == 0 else np.random.default_rng(k).permutation(n)


@dataclass
class Setup:
    """What every run of a study shares: the editor, its layers and hyper-parameters, the statistics' cache and
    corpus, and the target cache."""

    editor: str
    layers: list[int]
    hparams: dict[str, Any] = field(default_factory=dict)
    cache: StatsCache | None = None
    corpus: TextCorpus | None = None
    stats_tokens: int = 100_000
    targets: TargetCache = field(default_factory=TargetCache)

    def session(self, model: nn.Module, tok: object, path: pathlib.Path, config: dict[str, Any],
                eval_every: int = 0) -> EditSession:
        """A new run at ``path``: no perplexity, no generations, every edit re-tested at its checkpoints."""
        ed = get_editor(self.editor, {**self.hparams, "layers": list(self.layers)})
        return EditSession(model, tok, ed, out=path, cache=self.cache, corpus=self.corpus,
                           stats_tokens=self.stats_tokens, target_cache=self.targets, eval_every=eval_every,
                           retention_sample=0, eval_texts=[], generation_prompts=[], progress=False, config=config)


def arm_a(model: nn.Module, tok: object, records: list[dict[str, Any]], path: str | os.PathLike, setup: Setup,
          batch_size: int) -> Run:
    """Arm A: independent batches of ``batch_size`` records, each from W₀ and undone after it is scored."""
    path = pathlib.Path(path)
    if _finished(path, len(records)):
        return load_run(path)
    shutil.rmtree(path, ignore_errors=True)  # unfinished: redone (its targets are on disk)
    s = setup.session(model, tok, path, {"mode": ALONE, "batch_size": batch_size, "arm": "A", "n_edits": len(records),
                  "note": "finding (iii) arm A: independent batches, each applied to W0 and undone"})
    try:
        for i in range(0, len(records), batch_size):
            s.edit_batch(records[i:i + batch_size])
            s.restore()
    finally:
        s.restore()
    return load_run(path)


def arm_b(model: nn.Module, tok: object, records: list[dict[str, Any]], path: str | os.PathLike, setup: Setup,
          batch_size: int) -> Run:
    """Arm B: sequential batches of ``batch_size`` (accumulating), then one checkpoint re-testing all edits."""
    path = pathlib.Path(path)
    n = len(records)
    if _finished(path, n):
        return load_run(path)
    if (path / "config.json").exists():
        s = EditSession.resume(path, model, tok, records, cache=setup.cache, corpus=setup.corpus, progress=False)
        s.env.target_cache = setup.targets
    else:
        s = setup.session(model, tok, path, {"mode": "sequential-batch", "batch_size": batch_size, "arm": "B",
                                             "n_edits": n}, eval_every=n)
    try:
        s.run(records[s.n_edits:], batch_size=batch_size, progress=False)
    finally:
        s.restore()  # the next run starts from W₀ again
    return load_run(path)


def _finished(path: pathlib.Path, n: int) -> bool:
    if not (path / "config.json").exists():
        return False
    run = load_run(path)
    if len(run.edits) < n:
        return False
    return run.made_alone or (run.evals["edit_index"] == n - 1).any()


def batch_arms(model: nn.Module, tok: object, records: list[dict[str, Any]], out: str | os.PathLike, setup: Setup,
               n: int = 1024, batch_sizes: tuple[int, ...] = (16, 64, 256, 1024),
               orderings: tuple[int, ...] = (0, 1), arms: tuple[str, ...] = ("A", "B"),
               log: Any = None) -> dict[str, Run]:
    """Every (ordering, arm, B) run of one editor and layer set over the first ``n`` records; ``{name: Run}``.

    Arm A runs first for every ordering (their targets are W₀'s, shared), then arm B. ``setup.targets`` is
    replaced by the study's disk cache ``out/targets``."""
    if len(records) < n:
        raise CollapseDiagError(f"finding (iii) needs {n} records, the data holds {len(records)}")
    bad = [b for b in batch_sizes if n % b]
    if bad:
        raise CollapseDiagError(f"batch sizes {bad} do not divide N = {n}: every arm must total N edits")
    out = pathlib.Path(out)
    setup = dataclasses.replace(setup, targets=TargetCache(out / "targets"))
    arch = arch_for(model)
    w0 = {layer: weight_matrix(get_module(model, arch.rewrite_name(layer))).detach().clone() for layer in setup.layers}
    runs: dict[str, Run] = {}
    for arm in [a for a in ("A", "B") if a in arms]:
        for k in orderings:
            recs = [records[i] for i in ordering(n, k)]
            for b in batch_sizes:
                name = f"order{k}/arm{arm}-b{b}"
                if arm == "B" and b == n and "A" in arms:
                    runs[name] = runs[f"order{k}/armA-b{b}"]  # one batch of N: the same run in both arms
                    continue
                make = arm_a if arm == "A" else arm_b
                if log is not None:
                    log(f"{out.name}/{name}")
                runs[name] = make(model, tok, recs, out / name, setup, b)
                _check_w0(model, arch, w0, name)
    return runs


def _check_w0(model: nn.Module, arch: Any, w0: dict[int, Any], name: str) -> None:
    """Every run of finding (iii) starts from the unedited weights: stop if ``name`` left them edited."""
    for layer, w in w0.items():
        if not torch.equal(weight_matrix(get_module(model, arch.rewrite_name(layer))), w):
            raise CollapseDiagError(f"finding (iii): run {name} left layer {layer} edited; the next run would not "
                                    "start from the unedited weights")


def arm_table(runs: dict[str, Run]) -> pd.DataFrame:
    """Per run: ordering, arm, batch size, the mean scores right after each batch (``*_after_batch``) and,
    for arm B, of all N edits at the end (``*_end``; arm A has no end: every batch was undone)."""
    rows = []
    for name, run in runs.items():
        order, arm_b_name = name.split("/")
        ok = run.edits[run.edits["status"] == "ok"]
        row = {"run": name, "editor": run.config.get("editor"), "layers": " ".join(map(str, run.config["layers"])),
               "ordering": int(order[len("order"):]), "arm": arm_b_name[3], "batch_size": int(run.config["batch_size"]),
               "edits": len(run.edits)}
        for key in SCORES:
            col = ok[key].astype(float).dropna() if key in ok.columns else pd.Series(dtype=float)
            row[f"{key}_after_batch"] = float(col.mean()) if len(col) else float("nan")
        last = run.evals[run.evals["edit_index"] == len(run.edits) - 1]
        for key in SCORES:
            row[f"{key}_end"] = float(last[key].iloc[0]) if len(last) and not run.made_alone else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def finding_iii(table: pd.DataFrame, n: int, expected_batch_sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The verdict on finding (iii) from ``arm_table`` rows of one editor and layer set.

    Reproduced when, in arm A, the neighborhood score (mean over orderings) falls as B grows (every step
    down), and in arm B some B < N beats the single batch of N: ``reproduced`` reads arm B's N edits at the
    end, ``reproduced_after_batch`` each batch right after it (the seed's measure). Gives the means and the
    per-ordering range of each (arm, B); ``partial`` is True when some of ``expected_batch_sizes`` has no
    finished run yet (the verdict then reads only what is there)."""
    def by_b(arm: str, col: str) -> pd.DataFrame:
        t = table[table["arm"] == arm]
        return t.groupby("batch_size")[col].agg(["mean", "min", "max", "count"])

    a = by_b("A", "neighborhood_score_after_batch")
    b_end = by_b("B", "neighborhood_score_end")
    b_after = by_b("B", "neighborhood_score_after_batch")
    one = table[(table["batch_size"] == n)]
    single = float(one["neighborhood_score_after_batch"].mean()) if len(one) else float("nan")
    falls = bool(len(a) >= 2 and (np.diff(a["mean"].to_numpy()) < 0).all())

    def beats(t: pd.DataFrame) -> bool | None:
        smaller = t[t.index < n]
        return bool(np.isfinite(single) and (smaller["mean"] > single).any()) if len(smaller) else None

    expected = set(expected_batch_sizes) if expected_batch_sizes else None
    partial = expected is not None and not (expected <= set(a.index) and expected - {n} <= set(b_end.index))
    end, after = beats(b_end), beats(b_after)
    return {"arm_a_falls_with_b": falls if len(a) >= 2 else None,
            "arm_b_some_smaller_beats_single": end, "arm_b_after_batch_some_smaller_beats_single": after,
            "reproduced": (falls and bool(end)) if len(a) >= 2 and end is not None else None,
            "reproduced_after_batch": (falls and bool(after)) if len(a) >= 2 and after is not None else None,
            "partial": partial, "arm_a": a.round(4).to_dict("index"), "arm_b_end": b_end.round(4).to_dict("index"),
            "arm_b_after_batch": b_after.round(4).to_dict("index"), "single_batch": single}


def layer_sweep(model: nn.Module, tok: object, records: list[dict[str, Any]], out: str | os.PathLike, setup: Setup,
                candidates: list[int], n: int = 32) -> tuple[pd.DataFrame, int]:
    """One batch of the first ``n`` records at each single layer of ``candidates`` (from W₀, undone after):
    per layer the three scores and their harmonic mean (the seed's score); returns the table and the layer
    with the best score (the single layer of finding (iii)'s second layer set)."""
    out = pathlib.Path(out)
    targets = TargetCache(out / "targets")
    rows = []
    for layer in candidates:
        one = dataclasses.replace(setup, layers=[layer], targets=targets)
        run = arm_a(model, tok, records[:n], out / f"L{layer}", one, n)
        t = arm_table({f"order0/armA-b{n}": run}).iloc[0]
        scores = [t[f"{k}_after_batch"] for k in SCORES]
        hm = len(scores) / sum(1 / max(v, 1e-9) for v in scores) if all(np.isfinite(scores)) else float("nan")
        rows.append({"layer": layer, **{k: t[f"{k}_after_batch"] for k in SCORES}, "score": hm})
    table = pd.DataFrame(rows)
    if table["score"].isna().all():
        raise CollapseDiagError(f"layer sweep: no layer of {candidates} scored (every edit failed?), so none "
                                "can be chosen")
    return table, int(table.loc[table["score"].idxmax(), "layer"])

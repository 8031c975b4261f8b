"""The demo study: the papers' findings checked on one model and one fact set.

Runs sequential ROME, r-ROME, MEMIT and D4S, and MEMIT at larger batch sizes, on the same facts, then
says for each finding whether the data reproduce it, with the numbers:
  (i)   ROME makes disabling edits, r-ROME none;
  (ii)  weight_l1 growth tracks the loss of earlier edits, and D4S keeps it bounded;
  (iii) bigger batches lower the neighborhood score more than the same edits in smaller sequential batches;
  (iv)  collapse cases have the subject as the prompt's first token.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from ..analysis.flags import COLLAPSE_RATIO, disabling_edits, flag_disabling_edits
from ..analysis.growth import CANNOT_SAY, growth_vs_forgetting, spearman_or_nan, weight_l1_growth
from ..editors import get_editor
from ..editors.target import TargetCache
from ..signals.fluency import GENERATION_PROMPTS, heldout_texts
from ..progress import progress_bar
from ..runs.session import EditSession
from ..stats import StatsCache, TextCorpus
from ..runs.store import Run, load_run


@dataclass(frozen=True)
class StudySize:
    """How much the study does: edits per run, MEMIT batch sizes beyond 1, checkpoint spacing, evaluation."""

    n_edits: int
    batch_sizes: tuple[int, ...]
    eval_every: int
    eval_passages: int
    generation_prompts: int
    rome_eval_every: int = 1  # ROME and r-ROME: a checkpoint after every edit names a disabling edit itself


SIZES = {"small": StudySize(8, (8,), 4, 24, 4), "full": StudySize(48, (8, 48), 8, 72, 8)}


def study_plan(size: StudySize) -> list[tuple[str, str, int]]:
    """(run name, editor, batch size) of every run, in the order they are made."""
    plan = [("rome", "rome", 1), ("r-rome", "r-rome", 1), ("memit", "memit", 1)]
    plan += [(f"memit-batch{b}", "memit", b) for b in size.batch_sizes if b > 1]
    return plan + [("d4s", "d4s", 1)]


def study_layers(size: StudySize, hparams: dict[str, dict] | None = None) -> list[int]:
    """Every layer an editor of ``study_plan`` edits (ROME's layer among them, which the risk scan reads)."""
    editors = {editor for _, editor, _ in study_plan(size)}
    return sorted({layer for e in editors for layer in get_editor(e, (hparams or {}).get(e, {})).layers()})


def warm_statistics(model: nn.Module, tok: object, layers: list[int], stats_tokens: int = 100_000,
                    cache: StatsCache | None = None, progress: bool = True) -> None:
    """Compute the key statistics of every layer in ``layers`` in one pass over the packaged corpus, so the risk
    scan and each run find theirs in ``cache`` (layer by layer) instead of running the corpus again."""
    from ..arch import arch_for

    (cache or StatsCache()).get(model, tok, arch_for(model), layers, TextCorpus.packaged(), stats_tokens,
                                progress=progress)


def run_study(model: nn.Module, tok: object, records: list[dict[str, Any]], out: str | os.PathLike,
              size: StudySize, hparams: dict[str, dict] | None = None, stats_tokens: int = 100_000,
              corpus: TextCorpus | None = None, cache: StatsCache | None = None, seed: int = 0,
              progress: bool = True, templates: dict[tuple, list[str]] | None = None) -> dict[str, Run]:
    """Make every run of ``study_plan`` under ``out`` (each starting from the unedited model); returns them.

    ``templates``: context templates already generated with ``seed``, keyed by the editors' context lengths
    (e.g. a risk scan's); the rest are generated once per key and shared by the runs."""
    out = pathlib.Path(out)
    records = records[:size.n_edits]
    texts = heldout_texts(max_passages=size.eval_passages)
    prompts = list(GENERATION_PROMPTS[:size.generation_prompts])
    targets = TargetCache()
    templates = dict(templates or {})
    runs = {}
    plan = study_plan(size)
    bar = progress_bar(plan, desc="study", unit="run", disable=not progress)
    for name, editor_name, b in bar:
        bar.set_postfix(run=name)
        editor = get_editor(editor_name, (hparams or {}).get(editor_name, {}))
        run_dir = out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        mode = "sequential" if b == 1 else ("batch" if b >= len(records) else "sequential-batch")
        every = size.rome_eval_every if editor.single_edit_only else size.eval_every
        s = EditSession(model, tok, editor, out=run_dir, corpus=corpus or TextCorpus.packaged(),
                        stats_tokens=stats_tokens, cache=cache, seed=seed, eval_every=every,
                        eval_texts=texts, generation_prompts=prompts, target_cache=targets, progress=progress,
                        templates=templates.get(editor.context_lengths),
                        config={"data": "own", "n_edits": len(records), "mode": mode, "batch_size": b})
        templates[editor.context_lengths] = s.env.templates
        s.run(records, batch_size=b, progress=progress)
        s.restore()
        runs[name] = load_run(run_dir)
    bar.close()
    return runs


def demo_scan(model: nn.Module, tok: object, records: list[dict[str, Any]], size: StudySize,
              hparams: dict[str, dict] | None = None, stats_tokens: int = 100_000, cache: StatsCache | None = None,
              seed: int = 0) -> pd.DataFrame:
    """The risk scan of ``records`` at ROME's layer, with the same statistics and templates as the study's ROME
    run; ``in_demo`` marks the records the study edits."""
    from ..signals.scan import scan

    layer = int(get_editor("rome", (hparams or {}).get("rome", {})).hparams.layer)
    df = scan(model, tok, records, layer, corpus=TextCorpus.packaged(), stats_tokens=stats_tokens, cache=cache,
              seed=seed)
    df["in_demo"] = df["record_index"] < size.n_edits
    return df


def disabling_by_run(runs: dict[str, Run], perplexity_ratio: float = COLLAPSE_RATIO) -> dict[str, pd.DataFrame]:
    """Each run's disabling edits (perplexity ×``perplexity_ratio`` right after the edit), by run name."""
    return {name: disabling_edits(run, perplexity_ratio) for name, run in runs.items()}


FINDING_III = "(iii) bigger batches lower the neighborhood score more than the same edits in smaller sequential batches"


def study_findings(runs: dict[str, Run]) -> pd.DataFrame:
    """One row per finding: ``reproduced`` (True / False, or "cannot say" when the runs cannot decide) and the
    numbers."""
    rows = []
    rome, rrome = runs.get("rome"), runs.get("r-rome")
    if rome is not None and rrome is not None:
        fr, fq = flag_disabling_edits(rome), flag_disabling_edits(rrome)
        dr, dq = disabling_edits(rome, flags=fr), disabling_edits(rrome, flags=fq)
        den_r, den_q = rome.layers["denominator"], rrome.layers["denominator"]
        told = "; ".join(f"edit {r.edit_index} ({r.case_id}) perplexity x{r.perplexity_ratio:.1f}, flagged by "
                         f"{r.signals}" for r in dr.itertuples()) or "no ROME edit doubled perplexity"
        rows.append({"finding": "(i) ROME makes disabling edits, r-ROME none",
                     "reproduced": bool(len(dr) > 0 and dq.empty),
                     "evidence": f"{told}. ROME denominator min {den_r.min():.3g} vs median {den_r.median():.3g}. "
                                 f"r-ROME: {len(dq)} disabling edits, flagged: "
                                 f"{', '.join(map(str, sorted(set(fq['edit_index'])))) or 'none'}; "
                                 f"denominator min {den_q.min():.3g} vs median {den_q.median():.3g}"})
    pts = [p for name in ("rome", "r-rome", "memit") if name in runs for p in growth_vs_forgetting(runs[name])]
    if "d4s" in runs and "memit" in runs:
        g_d4s, g_memit = weight_l1_growth(runs["d4s"]).iloc[-1], weight_l1_growth(runs["memit"]).iloc[-1]
        rho = spearman_or_nan(pts)
        if not np.isfinite(rho):
            rho_text = (f"retention never changes over the {len(pts)} checkpoints of ROME, r-ROME and MEMIT, so "
                        f"Spearman ρ(growth, 1 − retention) is undefined")
        else:
            rho_text = f"Spearman ρ(growth, 1 − retention) = {rho:.2f} over {len(pts)} checkpoints of ROME, r-ROME and MEMIT"
        rows.append({"finding": "(ii) weight_l1 growth tracks forgetting; D4S keeps it bounded",
                     "reproduced": bool(rho > 0.5 and g_d4s < g_memit) if np.isfinite(rho) else CANNOT_SAY,
                     "evidence": f"{rho_text}; final growth D4S {100 * g_d4s:+.2f} % vs MEMIT {100 * g_memit:+.2f} %"})
    memits = sorted((int(r.config.get("batch_size") or 1), r) for n, r in runs.items() if n.startswith("memit"))
    if len(memits) >= 2:
        nb = [(b, float(r.evals.dropna(subset=["neighborhood_score"])["neighborhood_score"].iloc[-1])) for b, r in memits]
        rows.append({"finding": FINDING_III,
                     "reproduced": bool(nb[-1][1] < nb[0][1]),
                     "evidence": "MEMIT neighborhood score at the end: " +
                                 ", ".join(f"batch {b}: {v:.3f}" for b, v in nb)})
    if rome is not None:
        first = rome.edits.set_index("edit_index")["subject_first_token"].fillna(False).astype(bool)
        share_all = float(first.mean())
        collapsed = sorted(set(disabling_edits(rome)["edit_index"]))
        share_flag = float(first.loc[collapsed].mean()) if collapsed else np.nan
        rows.append({"finding": "(iv) collapse cases have the subject as the first token",
                     "reproduced": bool(share_flag > share_all) if collapsed else CANNOT_SAY,
                     "evidence": f"subject first in {share_flag:.0%} of ROME's disabling edits ({len(collapsed)}) "
                                 f"vs {share_all:.0%} of all its edits" if collapsed else
                                 f"no ROME edit disabled the model; subject first in {share_all:.0%} of its edits"})
    return pd.DataFrame(rows, columns=["finding", "reproduced", "evidence"])

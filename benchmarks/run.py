"""Speed and memory of every hot path on the embedded model, against the work it cannot avoid (issue 6).

Run: python benchmarks/run.py [--quick] [--data counterfact:../shared/data/counterfact.json]
Prints one JSON object. Keys and targets:
  stats_tokens_per_s, stats_speedup       key statistics at layer 5 vs a full forward over the same tokens (≥ 5)
  edit_seconds                            seconds per edit (compute + before/after scores), per editor
  edit_ratio_to_fwdbwd                    ROME's v* (20 steps, no early stop) vs 20 plain forward+backward
                                          passes of the full model over the same prompt batch (≤ 0.6)
  diag_overhead                           the same edits with diagnostics on vs off, as a fraction (≤ 0.05);
                                          diag_seconds_over_edit_seconds: the diagnostics' own code over the
                                          edit time, per editor.
                                          One-off, not per edit: C's eigendecomposition per layer
                                          (c_eigh_seconds_per_layer), saved beside the cached statistics
  eval_ratio_to_forward                   retention-evaluation tokens/s vs a bare forward (≥ 0.8)
  peak_rss_ratio                          peak resident memory of a run over the parameter bytes (≤ 2.5)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Callable

import torch

from collapsediag.arch import arch_for
from collapsediag.runs.checkpoints import scored_prompts
from collapsediag.data import load_data
from collapsediag.editors import get_editor
from collapsediag.editors import target as target_mod
from collapsediag.editors.context import generate_templates
from collapsediag.editors.target import optimise_target, target_batch
from collapsediag.signals.evaluate import target_probs
from collapsediag.models import load_model
from collapsediag.requests import EditRequest
from collapsediag.runs.session import EditSession
from collapsediag.stats import StatsCache, TextCorpus, compute_second_moments, token_chunks
from collapsediag.tokens import continuation, encode, pad_batch, target_ids

TARGETS = {"stats_speedup": (">=", 5.0), "edit_ratio_to_fwdbwd": ("<=", 0.6), "diag_overhead": ("<=", 0.05),
           "eval_ratio_to_forward": (">=", 0.8), "peak_rss_ratio": ("<=", 2.5)}
EDITORS = ["rome", "r-rome", "memit", "emmet", "d4s", "alphaedit"]


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_stats(model: torch.nn.Module, tok: object, n_tokens: int, layer: int = 5) -> dict:
    """Key statistics at ``layer`` vs a full forward (logits at every position) over the same chunks."""
    arch = arch_for(model)
    chunks = token_chunks(tok, TextCorpus.packaged(), n_tokens, 256)
    device = next(model.parameters()).device
    compute_second_moments(model, tok, arch, [layer], chunks[:8], progress=False)  # warm-up
    t_stats = timed(lambda: compute_second_moments(model, tok, arch, [layer], chunks, progress=False), 2)

    def full() -> None:
        with torch.no_grad():
            for i in range(0, len(chunks), 8):
                model(input_ids=torch.tensor(chunks[i:i + 8], device=device))

    t_full = timed(full, 2)
    n = sum(len(c) for c in chunks)
    return {"stats_tokens_per_s": n / t_stats, "stats_speedup": t_full / t_stats, "stats_tokens": n,
            "full_forward_tokens_per_s": n / t_full}


def plain_fwdbwd(model: torch.nn.Module, batch: "target_mod.TargetBatch", passes: int, params: bool) -> float:
    """Seconds for ``passes`` plain forward+backward passes: full logits, cross-entropy of the target tokens,
    backward to every parameter (``params``) or, with frozen weights, to the input embeddings."""
    rows, cols = batch.rows[:batch.n_tok], batch.cols[:batch.n_tok]
    model.requires_grad_(params)
    try:
        t0 = time.perf_counter()
        with torch.enable_grad():
            for _ in range(passes):
                if params:
                    out = model(input_ids=batch.ids, attention_mask=batch.mask)
                else:
                    emb = model.get_input_embeddings()(batch.ids).detach().requires_grad_(True)
                    out = model(inputs_embeds=emb, attention_mask=batch.mask)
                loss = torch.nn.functional.cross_entropy(out.logits[rows, cols].float(), batch.target_tokens)
                loss.backward()
                model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    finally:
        model.requires_grad_(False)


def bench_vstar(model: torch.nn.Module, tok: object, req: EditRequest, templates: list[str]) -> dict:
    """ROME's v* (all 20 steps) fast and full, against 20 plain forward+backward passes."""
    arch = arch_for(model)
    hp = get_editor("rome").hparams
    module = arch.rewrite_name(hp.layer)
    settings = hp.target_settings()
    saved = target_mod.EARLY_STOP
    target_mod.EARLY_STOP = -1.0  # every step runs
    try:
        optimise_target(model, tok, req, templates, module, target_mod.TargetSettings(steps=2), arch)  # warm-up
        t_fast = timed(lambda: optimise_target(model, tok, req, templates, module, settings, arch))
        t_full = timed(lambda: optimise_target(model, tok, req, templates, module, settings, arch, fast=False))
    finally:
        target_mod.EARLY_STOP = saved
    batch = target_batch(tok, req, templates)
    t_params = plain_fwdbwd(model, batch, settings.steps, params=True)
    t_frozen = plain_fwdbwd(model, batch, settings.steps, params=False)
    return {"edit_ratio_to_fwdbwd": t_fast / t_params, "edit_ratio_to_fwdbwd_frozen_weights": t_fast / t_frozen,
            "vstar_seconds": t_fast, "vstar_seconds_full_forward": t_full,
            "fwdbwd20_seconds": t_params, "fwdbwd20_frozen_seconds": t_frozen,
            "vstar_prompts": int(batch.ids.shape[0]), "vstar_padded_tokens": int(batch.ids.numel())}


def session(model: torch.nn.Module, tok: object, editor: str, templates: dict, diagnostics: bool = True
            ) -> EditSession:
    """An unsaved session of ``editor``; context templates shared through ``templates`` (made once per kind)."""
    ed = get_editor(editor)
    s = EditSession(model, tok, ed, out=None, progress=False, diagnostics=diagnostics,
                    templates=templates.get(ed.context_lengths))
    templates[ed.context_lengths] = s.env.templates
    return s


def seconds_of(editor: str, rows: list[dict]) -> list[float]:
    """Each row's seconds; raises if an edit failed."""
    bad = [r["status"] for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{editor}: {bad}")
    return [r["seconds"] for r in rows]


def edit_times(model: torch.nn.Module, tok: object, editor: str, records: list[dict], templates: dict,
               diagnostics: bool = True) -> list[float]:
    """Seconds of each sequential edit of ``records`` (from the unedited model, restored afterwards)."""
    s = session(model, tok, editor, templates, diagnostics)
    rows = s.run(records, progress=False)
    s.restore()
    return seconds_of(editor, rows)


class DiagTimer:
    """Within: seconds spent in the diagnostics alone, i.e. in ``Recorder.log`` (which computes the lazy
    values) and in ``EditSession._layer_rows`` (weight and update norms)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._saved: tuple = ()

    def _wrap(self, fn: Callable) -> Callable:
        def timed_fn(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed_fn

    def __enter__(self) -> "DiagTimer":
        from collapsediag.recorder import Recorder

        self._saved = (Recorder.log, EditSession._layer_rows)
        Recorder.log, EditSession._layer_rows = self._wrap(Recorder.log), self._wrap(EditSession._layer_rows)
        return self

    def __exit__(self, *exc: object) -> None:
        from collapsediag.recorder import Recorder

        Recorder.log, EditSession._layer_rows = self._saved


def bench_edits(model: torch.nn.Module, tok: object, records: list[dict], templates: dict) -> dict:
    """Median seconds per edit of every editor, and the share of that time spent in the diagnostics."""
    seconds, share = {}, {}
    for editor in EDITORS:
        with DiagTimer() as timer:
            times = edit_times(model, tok, editor, records, templates)
        seconds[editor] = float(torch.tensor(times).median())
        share[editor] = timer.seconds / sum(times)
    return {"edit_seconds": seconds, "diag_seconds_over_edit_seconds": share}


def bench_diagnostics(model: torch.nn.Module, tok: object, records: list[dict], templates: dict,
                      rounds: int) -> dict:
    """Each edit made twice in a row from the unedited weights, diagnostics off and on (order alternating),
    so slow drift of the machine's speed cancels within a pair: ROME and MEMIT, ``rounds`` passes over
    ``records``. Overhead = Σ on / Σ off − 1 over the pairs, with the standard error and the median of the
    pairs' ratios, and every pair's seconds."""
    out, err, med, raw = {}, {}, {}, {}
    for editor in ("rome", "memit"):
        s = session(model, tok, editor, templates)
        pairs = []
        for r in range(rounds):
            for i, record in enumerate(records):
                t = {}
                for diag in ((False, True) if (r + i) % 2 == 0 else (True, False)):
                    s.diagnostics = diag
                    t[diag], = seconds_of(editor, [s.edit(record)])
                    s.restore()
                pairs.append((t[False], t[True]))
        ratios = torch.tensor([on / off for off, on in pairs], dtype=torch.float64)
        out[editor] = sum(on for _, on in pairs) / sum(off for off, _ in pairs) - 1
        err[editor] = float(ratios.std() / len(ratios) ** 0.5)
        med[editor] = float(ratios.median()) - 1
        raw[editor] = [[round(off, 3), round(on, 3)] for off, on in pairs]
    return {"diag_overhead": max(out.values()), "diag_overhead_by_editor": out,
            "diag_overhead_standard_error": err, "diag_overhead_median_pair": med,
            "diag_overhead_pairs_off_on_seconds": raw}


def bench_eval(model: torch.nn.Module, tok: object, reqs: list[EditRequest]) -> dict:
    """``target_probs`` over every rewrite, paraphrase and neighborhood prompt (new and true target), against a
    bare forward (full logits) over the same sequences in the same sorted batches of 32."""
    prompts, targets, _, _ = scored_prompts(reqs)
    seqs = sorted((continuation(encode(tok, p), target_ids(tok, t))[0] for p, t in zip(prompts, targets)), key=len)
    device = next(model.parameters()).device

    def bare() -> None:
        with torch.no_grad():
            for i in range(0, len(seqs), 32):
                model(*pad_batch(tok, seqs[i:i + 32], device))

    target_probs(model, tok, prompts[:64], targets[:64])  # warm-up
    t_eval = timed(lambda: target_probs(model, tok, prompts, targets), 2)
    t_bare = timed(bare, 2)
    n = sum(len(s) for s in seqs)
    return {"eval_ratio_to_forward": t_bare / t_eval, "eval_tokens_per_s": n / t_eval,
            "bare_forward_tokens_per_s": n / t_bare, "eval_sequences": len(seqs)}


def rss_probe(data: str) -> dict:
    """In this process: load the model, make 2 ROME edits with a checkpoint; peak RSS over parameter bytes."""
    model, tok = load_model()
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = EditSession(model, tok, get_editor("rome"), out=None, progress=False, eval_every=2)
    s.run(load_data(data, 2), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"peak_rss_ratio": peak / params, "peak_rss_after_load_ratio": after_load / params,
            "peak_rss_mb": peak / 2 ** 20, "param_mb": params / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and edits (a smoke run)")
    ap.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        print(json.dumps(rss_probe(args.data)))
        return
    t0 = time.perf_counter()

    def note(what: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {what}", file=sys.stderr, flush=True)

    note("peak memory probe (a child process)")
    probe = subprocess.run([sys.executable, __file__, "--rss-probe", "--data", args.data], check=True,
                           capture_output=True, text=True)
    result: dict = json.loads(probe.stdout.strip().splitlines()[-1])
    model, tok = load_model()
    records = load_data(args.data, 40)
    reqs = [EditRequest.from_dict(r, case_id=i) for i, r in enumerate(records)]
    n_edit = 1 if args.quick else 3
    stats = StatsCache().get(model, tok, arch_for(model), [3, 4, 5, 6, 7], TextCorpus.packaged(), progress=False)
    result["c_eigh_seconds_per_layer"] = timed(lambda: torch.linalg.eigh(stats[5].mom2))
    templates: dict = {}
    note("key statistics")
    result.update(bench_stats(model, tok, 8_192 if args.quick else 32_768))
    ed = get_editor("rome")
    templates[ed.context_lengths] = generate_templates(model, tok, ed.context_lengths, seed=0)
    note("v* against plain forward+backward passes")
    result.update(bench_vstar(model, tok, reqs[0], templates[ed.context_lengths]))
    note("retention evaluation")
    result.update(bench_eval(model, tok, reqs[: 10 if args.quick else 40]))
    note("edits of every editor")
    result.update(bench_edits(model, tok, records[:n_edit], templates))
    note("diagnostics off and on")
    result.update(bench_diagnostics(model, tok, records[:n_edit], templates, 2 if args.quick else 4))
    result["meets_targets"] = {k: (result[k] >= v if op == ">=" else result[k] <= v)
                               for k, (op, v) in TARGETS.items()}
    result["threads"] = torch.get_num_threads()
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Long runs stay flat in cost: 10,000 sequential ROME edits on a tiny random model, a checkpoint every 100.

Prints one JSON object:
  per_edit_time_ratio  seconds per edit over edits 9,900–10,000 (their checkpoint included) against edits 0–100
                       (goal ≤ 1.2)
  load_run_seconds     load_run of the finished run once its parquet copy exists (load_run_first_seconds: the
                       first read, which writes the copy)
  bytes_per_edit       size of the run directory over the number of edits
  rss_ratio            peak RSS at the end against peak RSS after edit 100 (goal ≤ 1.2)
  model_at_seconds     rebuilding the model at the last edit (nearest snapshot + the updates after it)
and the per-chunk seconds. The records are the 10,000 CounterFact edits of ../shared/data/counterfact_mend
(EasyEdit schema); the tokenizer is collapsediag.testing's (built locally), the model random.

Run alone (no other heavy job): python benchmarks/long_run.py [--n 10000] [--out runs/long]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collapsediag import EditSession, load_run  # noqa: E402
from collapsediag.data import load_data  # noqa: E402
from collapsediag.editors import get_editor  # noqa: E402
from collapsediag.stats import StatsCache, TextCorpus  # noqa: E402
from collapsediag.testing import build_tokenizer, corpus_texts  # noqa: E402

DATA = "counterfact:" + str(pathlib.Path(__file__).resolve().parents[2] / "shared/data/counterfact_mend/counterfact-edit.json")


def tiny_model(vocab: int) -> torch.nn.Module:
    """A 2-layer GPT-2 of width 64 with random weights (positions enough for held-out perplexity)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # the local tokenizer's <|endoftext|>
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=100, help="checkpoint spacing")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--out", default="runs/long_run")
    args = ap.parse_args()
    torch.manual_seed(0)
    records = load_data(args.data, args.n)
    tok = build_tokenizer()
    model = tiny_model(len(tok))
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cache = StatsCache(out.parent / "long_run_stats")
    session = EditSession(model, tok, get_editor("rome", {"layer": 1, "v_num_grad_steps": 5}), out=out,
                          corpus=TextCorpus.from_texts(corpus_texts(300)), stats_tokens=6000, cache=cache,
                          templates=["{}", "The city of music. {}"], eval_every=args.every,
                          eval_texts=corpus_texts(4, seed=9), generation_prompts=["The city"], generation_tokens=8,
                          progress=False)
    chunks, rss_100 = [], None
    for start in range(0, len(records), args.every):
        t0 = time.perf_counter()
        session.run(records[start:start + args.every], progress=False)
        chunks.append(time.perf_counter() - t0)
        if rss_100 is None:
            rss_100 = peak_rss_mb()
        if len(chunks) % 10 == 0:
            print(f"edit {session.n_edits}: {chunks[-1]:.2f} s for the last {args.every}", file=sys.stderr, flush=True)
    rss_end = peak_rss_mb()
    t0 = time.perf_counter()
    run = load_run(out)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = load_run(out)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    run.model_at(len(records) - 1, model=tiny_model(len(tok)))
    model_at = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({
        "edits": len(run.edits), "per_edit_time_ratio": round(chunks[-1] / chunks[0], 3),
        "per_edit_seconds_first": round(chunks[0] / args.every, 4),
        "per_edit_seconds_last": round(chunks[-1] / args.every, 4),
        "load_run_seconds": round(load, 3), "load_run_first_seconds": round(first, 3),
        "bytes_per_edit": round(size / len(run.edits)), "rss_ratio": round(rss_end / rss_100, 3),
        "rss_mb_after_100": round(rss_100), "rss_mb_end": round(rss_end), "model_at_seconds": round(model_at, 3),
        "chunk_seconds": [round(c, 2) for c in chunks]}))


if __name__ == "__main__":
    main()

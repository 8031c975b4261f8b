"""Keep the candidate facts that the embedded model gets right before editing.

A fact is kept when p(target_true) > p(target_new) on its prompt and on every paraphrase.
Writes collapsediag/data/facts.jsonl and prints what it measured.
Run: python scripts/check_facts.py scripts/facts_candidates.jsonl
"""
from __future__ import annotations

import argparse
import json
import pathlib

from collapsediag.data import load_facts
from collapsediag.evaluate import target_probs
from collapsediag.models import load_model
from collapsediag.requests import EditRequest


def interleave(records: list[dict]) -> list[dict]:
    """Alternate prompts that start with the subject and prompts that do not."""
    first = [r for r in records if r["prompt"].startswith("{}")]
    inner = [r for r in records if not r["prompt"].startswith("{}")]
    out = []
    for i in range(max(len(first), len(inner))):
        out += first[i:i + 1] + inner[i:i + 1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("candidates")
    ap.add_argument("--out", default="collapsediag/data/facts.jsonl")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    kept = []
    for rec in load_facts(args.candidates):
        req = EditRequest.from_dict(rec)
        prompts = [req.text] + [p.format(req.subject) for p in req.paraphrase_prompts]
        n = len(prompts)
        p = target_probs(model, tok, prompts * 2, [req.target_true] * n + [req.target_new] * n)
        ok = bool((p[:n] > p[n:]).all())
        print(f"{'keep' if ok else 'drop'} {req.case_id}: p_true={p[0]:.3f} p_new={p[n]:.4f} "
              f"paraphrases={[round(float(x), 3) for x in p[1:n]]}")
        if ok:
            kept.append({k: v for k, v in rec.items() if not k.startswith("_")})
    kept = interleave(kept)
    pathlib.Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    print(f"kept {len(kept)} of the candidates -> {args.out}")


if __name__ == "__main__":
    main()

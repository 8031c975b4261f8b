"""Keep the candidate facts that the embedded model gets right before editing, and find the risky ones.

A fact is kept when p(target_true) > p(target_new) on its prompt and on every paraphrase.
Then the kept facts are scanned at layer 5 (``collapsediag.signals.scan``: ROME's denominator k_uᵀu, no edit made)
and the ``--confirm`` facts most at risk are edited alone with ROME and with r-ROME: a fact whose ROME edit
alone at least doubles held-out perplexity while r-ROME's does not is a confirmed disabling fact. The first
``--risky`` of those go to the positions ``--risky-at`` of the output, so the demo's first edits include them.
Writes collapsediag/data/facts.jsonl and prints what it measured.
Run: python scripts/check_facts.py scripts/facts_candidates.jsonl
"""
from __future__ import annotations

import argparse
import json
import pathlib

from collapsediag.data import load_facts
from collapsediag.signals.evaluate import target_probs
from collapsediag.signals.fluency import heldout_texts
from collapsediag.models import load_model
from collapsediag.requests import EditRequest
from collapsediag.signals.scan import scan
from collapsediag.experiments.alone import edit_each_alone


def interleave(records: list[dict]) -> list[dict]:
    """Alternate prompts that start with the subject and prompts that do not."""
    first = [r for r in records if r["prompt"].startswith("{}")]
    inner = [r for r in records if not r["prompt"].startswith("{}")]
    out = []
    for i in range(max(len(first), len(inner))):
        out += first[i:i + 1] + inner[i:i + 1]
    return out


def place_risky(model: object, tok: object, kept: list[dict], args: argparse.Namespace) -> list[dict]:
    """Scan ``kept``, confirm the riskiest by editing each alone, and move confirmed disabling facts early."""
    df = scan(model, tok, kept, args.layer)
    cols = ["risk_rank", "case_id", "denominator", "denominator_consistent", "denominator_ratio", "key_cosine",
            "subject_first_token"]
    print(df[cols].head(max(10, args.confirm)).to_string(index=False))
    top = [kept[i] for i in df["record_index"].head(args.confirm)]
    ratios = edit_each_alone(model, tok, top, ["rome", "r-rome"], heldout_texts(max_passages=args.passages),
                             layer=args.layer, templates=df.attrs["context_templates"], log=print)
    wide = ratios.pivot(index="case_id", columns="editor", values="ratio")
    took = ratios[ratios["editor"] == "r-rome"].set_index("case_id")["efficacy"]
    print(wide.assign(r_rome_took=took).to_string())
    confirmed = [r for r in top if wide.loc[str(r["case_id"]), "rome"] >= 2 > wide.loc[str(r["case_id"]), "r-rome"]]
    print(f"confirmed disabling facts: {[r['case_id'] for r in confirmed]}")
    risky = confirmed[:args.risky]
    rest = [r for r in kept if r not in risky]
    for pos, rec in sorted(zip(args.risky_at, risky)):
        rest.insert(pos, rec)
    return rest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("candidates")
    ap.add_argument("--out", default="collapsediag/data/facts.jsonl")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--confirm", type=int, default=8, help="edit alone the N facts most at risk")
    ap.add_argument("--risky", type=int, default=1, help="confirmed disabling facts placed early")
    ap.add_argument("--risky-at", type=int, nargs="+", default=[3], help="their positions in the output")
    ap.add_argument("--passages", type=int, default=24, help="held-out passages for perplexity (the demo's)")
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
    kept = place_risky(model, tok, interleave(kept), args)
    pathlib.Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    print(f"kept {len(kept)} of the candidates -> {args.out}")


if __name__ == "__main__":
    main()

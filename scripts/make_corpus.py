"""Regenerate collapsediag/data/corpus_smollm2.txt: text sampled from the embedded model.

The key statistics C = E[k kᵀ] need English text; the demo must run offline, so the
project ships text that SmolLM2-135M-Instruct itself wrote from short neutral openings
(seeded, top-p sampling). Run: python scripts/make_corpus.py --tokens 100000
"""
from __future__ import annotations

import argparse
import itertools
import pathlib

import torch

SUBJECTS = [
    "history", "geography", "economy", "music", "science", "architecture", "language",
    "religion", "climate", "literature", "sport", "politics", "medicine", "agriculture",
    "transport", "art", "education", "technology", "cuisine", "philosophy",
]
OPENINGS = [
    "The {} of the region", "In the early years,", "According to historians,", "The city is known for its {}",
    "During the 19th century,", "He was born in", "She studied {} at", "The river flows through",
    "The company was founded in", "Scientists believe that", "The album was released", "The war ended when",
    "The book describes", "In mathematics,", "The island lies", "Its population grew", "The team won",
    "The building was designed", "Many people", "The festival takes place", "The king ordered",
    "Researchers found that", "The film tells the story", "The language spoken", "The mountain range",
]


def openings() -> list[str]:
    out = []
    for o, s in itertools.product(OPENINGS, SUBJECTS):
        out.append(o.format(s) if "{}" in o else o)
    return sorted(set(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--new", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="collapsediag/data/corpus_smollm2.txt")
    args = ap.parse_args()
    from collapsediag.models import load_model

    model, tok = load_model("smollm2-135m")
    tok.padding_side = "left"
    torch.manual_seed(args.seed)
    prompts = openings()
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    total, paras = 0, []
    path = pathlib.Path(args.out)
    i = 0
    while total < args.tokens:
        batch = [prompts[order[(i + j) % len(order)]] for j in range(args.batch)]
        i += args.batch
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new, do_sample=True, top_p=0.95,
                                 pad_token_id=tok.pad_token_id)
        for row in out:
            text = tok.decode(row, skip_special_tokens=True).strip()
            text = " ".join(text.split())
            if len(text.split()) < 20:
                continue
            paras.append(text)
            total += len(tok(text)["input_ids"])
        path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        print(f"{total} tokens", flush=True)


if __name__ == "__main__":
    main()

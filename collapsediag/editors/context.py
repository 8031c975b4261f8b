"""Random context prefixes ("templates"), generated once per run from the unedited model."""
from __future__ import annotations

import re

import torch
from torch import nn

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
# ROME: 10 prefixes of ≤5 new tokens and 10 of ≤10, plus the unprefixed template.
DEFAULT_LENGTHS = ((5, 10), (10, 10))
# MEMIT and its descendants: 5 prefixes of ≤10 tokens plus the unprefixed template (ALGORITHMS.md §5.2).
MEMIT_LENGTHS = ((10, 5),)


_WORD = re.compile(r"[A-Za-z][A-Za-z']*[.,;:!?\"]*")


def has_words(text: str, min_words: int = 2) -> bool:
    """True if ``text`` holds at least ``min_words`` space-separated alphabetic words.

    "The-the-key-." or "--,-. {}" (what an instruct model often samples) do not count.
    """
    return sum(1 for w in text.split() if _WORD.fullmatch(w)) >= min_words


def generate_templates(model: nn.Module, tok: object, lengths: tuple[tuple[int, int], ...] = DEFAULT_LENGTHS,
                       seed: int = 0, max_tries: int = 20) -> list[str]:
    """``["{}"]`` plus one ``"<prefix>. {}"`` per requested prefix, sampled top-k 5 from seed words.

    Prefixes without words are re-sampled; braces are removed so the templates format safely.
    """
    gen_device = next(model.parameters()).device
    templates = ["{}"]
    cpu_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for length, count in lengths:
            for i in range(count):
                word = SEED_WORDS[i % len(SEED_WORDS)]
                text = word
                for _ in range(max_tries):
                    text = _sample(model, tok, word, length, gen_device)
                    if has_words(text):
                        break
                clean = " ".join(text.replace("{", " ").replace("}", " ").split())
                templates.append(clean + ". {}")
    finally:
        torch.random.set_rng_state(cpu_state)
    return templates


def _sample(model: nn.Module, tok: object, word: str, length: int, device: torch.device) -> str:
    ids = tok(word, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=length, do_sample=True, top_k=5,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)

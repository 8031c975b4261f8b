"""Held-out perplexity and n-gram generation entropy."""
from __future__ import annotations

import math

import pytest
import torch

from collapsediag.signals.fluency import generate, generation_entropy, heldout_texts, n_gram_entropy, perplexity
from tests.conftest import corpus_texts


def test_perplexity_matches_hf_loss(tiny):
    model, tok = tiny
    texts = corpus_texts(5, seed=3)
    total, count = 0.0, 0
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_n_gram_entropy_values():
    assert n_gram_entropy("a a a a a a") == 0.0
    # 4 distinct bigrams and 3 distinct trigrams, each seen once
    expected = (2 / 3 * math.log2(4) + 4 / 3 * math.log2(3)) / 2
    assert n_gram_entropy("w x y z v") == pytest.approx(expected)
    assert n_gram_entropy("the cat sat on the mat") > n_gram_entropy("the the the the the the")


def test_generation_is_seeded(tiny):
    model, tok = tiny
    a = generate(model, tok, ["The city", "I think that"], max_new_tokens=6, seed=1)
    b = generate(model, tok, ["The city", "I think that"], max_new_tokens=6, seed=1)
    assert a == b and len(a) == 2
    assert tok.padding_side == "right"
    assert generation_entropy(model, tok, ["The city"], max_new_tokens=6, seed=1) >= 0


def test_heldout_texts_exist():
    texts = heldout_texts()
    assert len(texts) >= 20 and all(len(t.split()) >= 20 for t in texts)

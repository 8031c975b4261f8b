"""Tiny random models built from configs and a tokenizer trained locally: no downloads.

The builders live in ``collapsediag.testing`` (benchmarks use them too); they are re-exported here for the tests.
"""
from __future__ import annotations

import random

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

from collapsediag.testing import (OBJECTS, SUBJECTS, TEMPLATES, WORDS, build_tokenizer,  # noqa: E402,F401
                                  corpus_texts, make_model)


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tok):
    """(model, tok) for GPT-2 (Conv1D) and Llama (Linear)."""
    return make_model(request.param, len(tok)), tok


@pytest.fixture
def env_for(tok):
    """Build an EditEnv (stats over the synthetic corpus, 3 templates) for a model."""
    from collapsediag.arch import arch_for
    from collapsediag.editors.base import EditEnv
    from collapsediag.stats import StatsCache, TextCorpus

    def build(model, layers, tmp_path, templates=None):
        arch = arch_for(model)
        stats = StatsCache(tmp_path).get(model, tok, arch, layers, TextCorpus.from_texts(corpus_texts(300)),
                                         n_tokens=6000, seq_len=32, progress=False)
        templates = templates or ["{}", "The city of music. {}", "Because you said so. {}"]
        return EditEnv(arch=arch, stats=stats, templates=templates)

    return build


@pytest.fixture(autouse=True)
def _seed_and_close():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses the embedded SmolLM2-135M model")

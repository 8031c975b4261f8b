"""What a run's config records and what is rebuilt from it: versions, plain rows, the key statistics."""
from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..arch import ArchSpec
from ..errors import CollapseDiagError
from ..stats import LayerStats, StatsCache, TextCorpus


def versions() -> dict[str, str]:
    """The versions a run records: collapsediag, torch, transformers, numpy and Python."""
    import transformers

    return {"collapsediag": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """A table row as plain Python values (NaN kept as float)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}


def stats_from_config(model: nn.Module, tok: object, arch: ArchSpec, cfg: dict[str, Any],
                      cache: StatsCache | None, corpus: TextCorpus | None, progress: bool) -> dict[int, LayerStats]:
    """Key statistics with the identity recorded in a run's config (from the cache or recomputed)."""
    idents = cfg["stats"]
    first = next(iter(idents.values()))
    if first.get("source") == "published":  # loaded from the field's npz files: read the same files again
        from ..editors.published import stats_for_module

        return {int(key): stats_for_module(ident["file"], model, arch, int(key)) for key, ident in idents.items()}
    if corpus is None:
        corpus = TextCorpus.from_file(first["corpus"])  # the packaged corpus is recorded by its path too
    if corpus.sha256 != first["corpus_sha256"]:
        raise CollapseDiagError(f"statistics corpus {corpus.name} differs from the run's ({first['corpus']})")
    layers = [int(k) for k in idents]
    return (cache or StatsCache()).get(model, tok, arch, layers, corpus, first["n_tokens_requested"],
                                       first["seq_len"], progress=progress)

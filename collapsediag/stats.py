"""Key second moments C = E[k kᵀ] of an edited projection's input, streamed and cached on disk.

>>> cache = StatsCache("~/.cache/collapsediag")
>>> stats = cache.get(model, tok, arch, layers=[5], corpus=TextCorpus.from_file("wiki.txt"), n_tokens=100_000)
>>> stats[5].solve(k)        # C⁻¹ k through a cached Cholesky factor
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import nn
from .progress import progress_bar

from .arch import ArchSpec
from .errors import CollapseDiagError
from .linalg import condition_of, spd_extremes
from .hooks import TraceDict
from .models import model_fingerprint, model_name

PACKAGED_CORPUS = pathlib.Path(__file__).parent / "data" / "corpus_smollm2.txt"


@dataclass
class TextCorpus:
    """A list of text passages and its content hash."""

    texts: list[str]
    name: str = "texts"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TextCorpus":
        """Passages of a text file, split on blank lines (falls back to lines)."""
        p = pathlib.Path(path).expanduser()
        if not p.exists():
            raise CollapseDiagError(f"corpus file {p} does not exist")
        raw = p.read_text(encoding="utf-8", errors="replace")
        parts = [t.strip() for t in raw.split("\n\n") if t.strip()]
        if len(parts) < 2:
            parts = [t.strip() for t in raw.splitlines() if t.strip()]
        return cls(parts, name=str(p))

    @classmethod
    def from_texts(cls, texts: Iterable[str], name: str = "texts") -> "TextCorpus":
        """Wrap any iterable of strings."""
        return cls([t for t in texts if t and t.strip()], name=name)

    @classmethod
    def packaged(cls) -> "TextCorpus":
        """The corpus shipped with collapsediag (text sampled from the embedded model)."""
        return cls.from_file(PACKAGED_CORPUS)

    @property
    def sha256(self) -> str:
        """Hash of the passages (order matters)."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()[:16]


def token_chunks(tok: object, corpus: TextCorpus, n_tokens: int, seq_len: int) -> list[list[int]]:
    """Tokenise the corpus as one stream and cut it into full ``seq_len`` chunks (no padding)."""
    stream: list[int] = []
    sep = tok.eos_token_id
    for text in corpus.texts:
        stream.extend(tok(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= n_tokens:
            break
    stream = stream[:n_tokens]
    if len(stream) < seq_len:
        if not stream:
            raise CollapseDiagError(f"corpus {corpus.name} has no tokens")
        return [stream]
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


@dataclass
class LayerStats:
    """Uncentred second moment of the keys at one layer, with its identity."""

    layer: int
    mom2: torch.Tensor  # [d_in, d_in] float64
    count: int
    identity: dict = field(default_factory=dict)
    _chol: torch.Tensor | None = field(default=None, repr=False)
    _eig: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _extremes: tuple[float, float] | None = field(default=None, repr=False)

    @property
    def chol(self) -> torch.Tensor:
        """Lower Cholesky factor of C (computed once)."""
        if self._chol is None:
            factor, info = torch.linalg.cholesky_ex(self.mom2)
            if int(info) != 0:
                raise CollapseDiagError(
                    f"key second moment at layer {self.layer} is singular ({self.count} tokens, "
                    f"dim {self.mom2.shape[0]}): use more text")
            self._chol = factor
        return self._chol

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """C⁻¹ x in float64 (x: [d_in] or [d_in, n]); returned in x's dtype."""
        x64 = x.to(self.mom2.dtype)
        vec = x64.dim() == 1
        out = torch.cholesky_solve(x64.unsqueeze(1) if vec else x64, self.chol)
        return (out.squeeze(1) if vec else out).to(x.dtype)

    @property
    def eigh_file(self) -> pathlib.Path | None:
        """Where C's eigendecomposition is kept next to the cached statistics (None when not from a cache)."""
        cache = self.identity.get("cache_file")
        return pathlib.Path(cache).with_suffix(".eigh.npz") if cache else None

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenvectors of C: computed once (0.5 s at d = 1536) and saved beside
        the cached statistics, so later sessions read it."""
        if self._eig is None:
            path = self.eigh_file
            if path is not None and path.exists():
                with np.load(path) as z:
                    eig = torch.from_numpy(z["values"]), torch.from_numpy(z["vectors"])
            else:
                eig = torch.linalg.eigh(self.mom2)
                if path is not None:
                    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
                    try:
                        np.savez(tmp, values=eig[0].cpu().numpy(), vectors=eig[1].cpu().numpy())
                        os.replace(tmp, path)
                    except OSError:  # a read-only cache: computed again next session
                        tmp.unlink(missing_ok=True)
            self._eig = eig[0].to(self.mom2.device), eig[1].to(self.mom2.device)
        return self._eig

    def extremes(self) -> tuple[float, float]:
        """(λ_min, λ_max) of C (computed once; exact from ``eigh`` when it is at hand, else Lanczos)."""
        if self._extremes is None:
            if self._eig is not None:
                self._extremes = float(self._eig[0][0]), float(self._eig[0][-1])
            else:
                self._extremes = spd_extremes(self.mom2, self._chol)
        return self._extremes

    def condition(self) -> float:
        """Condition number of C (computed once)."""
        return condition_of(*self.extremes())


def compute_second_moments(model: nn.Module, tok: object, arch: ArchSpec, layers: list[int],
                           chunks: list[list[int]], batch_size: int = 8,
                           progress: bool = True) -> dict[int, tuple[torch.Tensor, int]]:
    """Σ k kᵀ / count at every layer, running the model only up to the highest layer."""
    names = [arch.rewrite_name(layer) for layer in sorted(layers)]
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = 0
    bar = progress_bar(total=sum(len(c) for c in chunks), unit="tok", desc="key statistics", disable=not progress)
    with torch.no_grad():
        for i in range(0, len(chunks), batch_size):
            group = chunks[i:i + batch_size]
            width = min(len(c) for c in group)
            ids = torch.tensor([c[:width] for c in group], device=device)
            with TraceDict(model, names, retain_input=True, stop=True) as traces:
                model(input_ids=ids)
            for name in names:
                k = traces[name].input.reshape(-1, traces[name].input.shape[-1]).float()
                part = (k.T @ k).double()
                sums[name] = sums[name] + part if name in sums else part
            count += ids.numel()
            bar.update(ids.numel())
    bar.close()
    return {layer: (sums[name] / count, count) for layer, name in zip(sorted(layers), names)}


class StatsCache:
    """Key statistics cached as .npz files, keyed by model identity, layer, corpus, tokens and dtype."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        default = os.environ.get("COLLAPSEDIAG_CACHE", "~/.cache/collapsediag")
        self.directory = pathlib.Path(directory or default).expanduser() / "stats"

    def identity(self, model: nn.Module, arch: ArchSpec, layer: int, corpus: TextCorpus,
                 n_tokens: int, seq_len: int) -> dict:
        """The fields that make statistics reusable."""
        return {"model": model_name(model), "model_fingerprint": model_fingerprint(model),
                "module": arch.rewrite_name(layer), "layer": layer, "corpus": corpus.name,
                "corpus_sha256": corpus.sha256, "n_tokens_requested": n_tokens, "seq_len": seq_len,
                "dtype": "float64"}

    def path(self, ident: dict) -> pathlib.Path:
        """Cache file for an identity."""
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        return self.directory / f"{ident['model_fingerprint']}_L{ident['layer']}_{key}.npz"

    def get(self, model: nn.Module, tok: object, arch: ArchSpec, layers: list[int], corpus: TextCorpus,
            n_tokens: int = 100_000, seq_len: int = 256, progress: bool = True) -> dict[int, LayerStats]:
        """Load or compute the statistics of every layer in ``layers``."""
        out: dict[int, LayerStats] = {}
        idents = {layer: self.identity(model, arch, layer, corpus, n_tokens, seq_len) for layer in layers}
        missing = []
        for layer, ident in idents.items():
            p = self.path(ident)
            if p.exists():
                with np.load(p) as z:
                    ident = dict(ident, token_count=int(z["count"]), cache_file=str(p))
                    out[layer] = LayerStats(layer, torch.from_numpy(z["mom2"]), int(z["count"]), ident)
            else:
                missing.append(layer)
        if missing:
            chunks = token_chunks(tok, corpus, n_tokens, seq_len)
            computed = compute_second_moments(model, tok, arch, missing, chunks, progress=progress)
            self.directory.mkdir(parents=True, exist_ok=True)
            for layer, (mom2, count) in computed.items():
                p = self.path(idents[layer])
                tmp = p.with_suffix(".tmp.npz")
                np.savez(tmp, mom2=mom2.cpu().numpy(), count=count)
                os.replace(tmp, p)
                ident = dict(idents[layer], token_count=count, cache_file=str(p))
                out[layer] = LayerStats(layer, mom2.cpu(), count, ident)
        from .arch import get_module, weight_matrix

        for layer, s in out.items():  # on the device of the module it serves (device_map may spread layers)
            s.mom2 = s.mom2.to(weight_matrix(get_module(model, arch.rewrite_name(layer))).device)
        return out

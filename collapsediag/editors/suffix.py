"""Forward passes for the target optimisation: the plain one and one that recomputes only what δ changes.

δ is added at layer L at the subject's last token s of every row. Nothing at layers ≤ L depends on it,
and no position before s does either (attention is causal). So ``SuffixForward`` runs the whole batch
once, keeps every layer's keys and values and block L's output, and each step then runs only the
positions from s on through the blocks after L, attending to the cached keys and values.
Its first logits are checked against the full forward's; on a mismatch the plain forward is used.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ..forward import PLAIN_HEAD, cache_kwargs, logits_at
from ..hooks import SkipBlocks, Trace

if TYPE_CHECKING:
    from ..arch import ArchSpec
    from .prompts import StackedBatch, TargetBatch

CHECK_TOLERANCE = 1e-3  # largest |Δlogit| / max |logit| accepted between the two forwards
GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' SDPA attention at every call


class PlainForward:
    """Logits at ``(rows, cols)`` of the whole model with δ added to ``module``'s output at ``(r, subj[r])``."""

    def __init__(self, model: nn.Module, module: str, batch: "TargetBatch | StackedBatch") -> None:
        self.model, self.module, self.ids, self.mask = model, module, batch.ids, batch.mask
        self.subj, self.rows, self.cols = batch.subj, batch.rows, batch.cols
        self.all_rows = torch.arange(len(self.ids), device=self.ids.device)
        with torch.no_grad(), Trace(model, module, retain_output=True, stop=True) as tr:
            model(input_ids=self.ids, attention_mask=self.mask)
        self.inits = tr.output[self.all_rows.to(tr.output.device), self.subj.to(tr.output.device)].detach().clone()
        self.init = self.inits[0]

    def take(self, idx: torch.Tensor) -> "PlainForward":
        """The same forward over the rows ``idx`` only (their logit positions kept in order)."""
        from .prompts import kept_positions

        part = object.__new__(PlainForward)
        keep, rows = kept_positions(self.rows, idx, len(self.ids))
        part.model, part.module, part.ids, part.mask = self.model, self.module, self.ids[idx], self.mask[idx]
        part.subj, part.rows, part.cols = self.subj[idx], rows, self.cols[keep]
        part.all_rows = torch.arange(len(idx), device=self.ids.device)
        part.inits = self.inits[idx.to(self.inits.device)]
        part.init = part.inits[0]
        return part

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits with ``delta`` added."""
        def add_delta(hidden: torch.Tensor) -> torch.Tensor:
            hidden = hidden.clone()
            hidden[self.all_rows, self.subj] = hidden[self.all_rows, self.subj] + delta.to(hidden.dtype)
            return hidden

        with Trace(self.model, self.module, edit_output=add_delta, detach=False):
            return logits_at(self.model, self.ids, self.mask, self.rows, self.cols)


@contextmanager
def grouped_kv_attention() -> Iterator[None]:
    """Within: transformers' SDPA attention shares each key/value head among its query heads (``enable_gqa``)
    instead of copying it per head, so the autograd graph of a grouped-query model (Llama) keeps the keys and
    values once. Same numbers; where transformers ignores the switch nothing changes."""
    old = os.environ.get(GQA_SWITCH)
    os.environ[GQA_SWITCH] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[GQA_SWITCH]
        else:
            os.environ[GQA_SWITCH] = old


def _kv_pairs(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a transformers cache (new ``layers`` or older ``key_cache`` API)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def kv_pairs(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a transformers cache, for other modules (it calls ``_kv_pairs``, which
    tests replace to stand for a model that keeps no keys and values)."""
    return _kv_pairs(cache)


class SuffixForward:
    """The same logits as ``PlainForward``, computing only blocks after ``layer`` at positions ≥ subj.

    ``module``'s output change must equal block ``layer``'s output change (``arch.block_of``).
    Raises ``ValueError`` when the model's cache or block outputs cannot be used this way.
    """

    def __init__(self, model: nn.Module, arch: "ArchSpec", layer: int, module: str,
                 batch: "TargetBatch | StackedBatch") -> None:
        from transformers import DynamicCache

        ids, mask, subj, rows, cols = batch.ids, batch.mask, batch.subj, batch.rows, batch.cols
        self.model, self.arch, self.layer = model, arch, layer
        device = ids.device
        b, width = ids.shape
        lengths = mask.sum(1)
        self.new_len = int((lengths - subj).max())
        offs = torch.arange(self.new_len, device=device)
        pos = (subj[:, None] + offs[None, :]).clamp(max=width - 1)
        self.new_mask = torch.cat([(torch.arange(width, device=device)[None, :] < subj[:, None]).long(),
                                   (subj[:, None] + offs[None, :] < lengths[:, None]).long()], dim=1)
        self.new_ids = ids.gather(1, pos)
        self.positions = pos
        self.rows, self.cols = rows, cols - subj[rows]
        cache = DynamicCache()
        with torch.no_grad(), Trace(model, module, retain_output=True) as tr, \
                Trace(model, arch.block_name(layer), retain_output=True) as out:
            hidden = model.base_model(input_ids=ids, attention_mask=mask,
                                      **cache_kwargs(model.base_model, cache)).last_hidden_state
        self.inits = tr.output[torch.arange(b, device=tr.output.device), subj.to(tr.output.device)].detach().clone()
        self.init = self.inits[0]
        self.like = out.raw_output
        self.block_out = out.output.gather(1, pos[:, :, None].expand(-1, -1, out.output.shape[-1])).clone()
        self.kv = [(k.detach(), v.detach()) for k, v in _kv_pairs(cache)]
        if len(self.kv) <= layer or self.kv[0][0].shape[-2] != width:
            raise ValueError("the model's cache does not hold every layer's keys and values")
        self.expected = model.get_output_embeddings()(hidden[rows, cols])

    def take(self, idx: torch.Tensor) -> "SuffixForward":
        """The same forward over the rows ``idx`` only (their logit positions kept in order)."""
        from .prompts import kept_positions

        part = object.__new__(SuffixForward)
        keep, rows = kept_positions(self.rows, idx, len(self.new_ids))
        part.model, part.arch, part.layer, part.like, part.new_len = self.model, self.arch, self.layer, self.like, \
            self.new_len
        part.new_mask, part.new_ids, part.positions = self.new_mask[idx], self.new_ids[idx], self.positions[idx]
        part.rows, part.cols, part.expected = rows, self.cols[keep], self.expected[keep.to(self.expected.device)]
        part.block_out = self.block_out[idx.to(self.block_out.device)]
        part.kv = [(k[idx.to(k.device)], v[idx.to(v.device)]) for k, v in self.kv]
        part.inits = self.inits[idx.to(self.inits.device)]
        part.init = part.inits[0]
        return part

    def logits(self, delta: torch.Tensor) -> torch.Tensor:
        """Logits with ``delta`` added at the subject (position 0 of every suffix): one vector for every row, or
        one per row ([rows, d])."""
        from transformers import DynamicCache

        def block_out() -> torch.Tensor:
            hidden = self.block_out.clone()
            hidden[:, 0] = hidden[:, 0] + delta.to(hidden.dtype)
            return hidden

        cache = DynamicCache(self.kv)
        with SkipBlocks(self.model, self.arch.blocks_name(), self.layer, self.like, block_out), \
                grouped_kv_attention():
            return logits_at(self.model, self.new_ids, self.new_mask, self.rows, self.cols,
                             position_ids=self.positions, **cache_kwargs(self.model.base_model, cache))

    def check(self) -> bool:
        """True when the suffix logits at δ = 0 match the full forward's."""
        with torch.no_grad():
            got = self.logits(torch.zeros_like(self.init))
        scale = float(self.expected.abs().max().clamp_min(1e-6))
        # half precision rounds the two orders of summation differently: its own resolution is the bar there
        tol = max(CHECK_TOLERANCE, 8 * torch.finfo(got.dtype).eps) if got.dtype in (torch.bfloat16, torch.float16) \
            else CHECK_TOLERANCE
        return bool(torch.isfinite(got).all()) and float((got - self.expected).abs().max()) <= tol * scale


def target_forward(model: nn.Module, arch: "ArchSpec | None", module: str, batch: "TargetBatch",
                   fast: bool = True) -> PlainForward | SuffixForward:
    """``SuffixForward`` where it applies and reproduces the full forward, else ``PlainForward``."""
    from ..arch import block_of

    layer = block_of(model, arch, module) if fast and arch is not None else None
    if layer is not None and model.config.model_type in PLAIN_HEAD:
        try:
            fwd = SuffixForward(model, arch, layer, module, batch)
            if fwd.check():
                return fwd
            warnings.warn(f"{model.config.model_type}: the suffix forward differs from the full one; "
                          "using the full forward", stacklevel=2)
        except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
            warnings.warn(f"{model.config.model_type}: no suffix forward ({exc}); using the full forward",
                          stacklevel=2)
    return PlainForward(model, module, batch)

"""ROME (original implementation) and r-ROME: rank-one updates of one MLP output projection.

With u = C⁻¹k̄ / ‖C⁻¹k̄‖ (k̄: the key averaged over the context templates):
  ROME:   ΔW = (v* − W k_u − b) uᵀ / (k_uᵀ u)     k_u: the unprefixed key   (ALGORITHMS.md §2.3)
  r-ROME: ΔW = (v* − v̄) uᵀ / (k̄ᵀ u)              v̄ = mean of W k_j + b      (ALGORITHMS.md §3.1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..arch import get_module, weight_matrix
from ..errors import EditError
from ..recorder import Recorder
from ..requests import EditRequest
from .base import Delta, EditEnv, EditorBase, HParams
from .context import DEFAULT_LENGTHS
from .keys import keys_at_subject
from .target import TargetSettings, mpes_count, target_for, target_signals


@dataclass
class RomeHParams(HParams):
    """ROME / r-ROME hyper-parameters (defaults: kmeng01/rome GPT-style settings, layer 5)."""

    layer: int = 5
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mpes: int = 0  # most-probable early stopping after |mpes| all-argmax steps (ENCORE: -k); 0 = off

    def target_settings(self) -> TargetSettings:
        """The shared target-optimisation settings."""
        return TargetSettings(steps=self.v_num_grad_steps, lr=self.v_lr, weight_decay=self.v_weight_decay,
                              clamp_norm_factor=self.clamp_norm_factor, kl_factor=self.kl_factor,
                              mpes=mpes_count(self.mpes))


class Rome(EditorBase):
    """Original ROME: the unprefixed key k_u enters the denominator and the value residual."""

    name: ClassVar[str] = "rome"
    single_edit_only: ClassVar[bool] = True
    context_lengths: ClassVar[tuple[tuple[int, int], ...]] = DEFAULT_LENGTHS
    consistent_keys: ClassVar[bool] = False
    HParams: ClassVar[type] = RomeHParams

    def layers(self) -> list[int]:
        """The single edited layer."""
        return [self.hparams.layer]

    def compute(self, model: nn.Module, tok: object, requests: list[EditRequest], env: EditEnv,
                rec: Recorder) -> list[Delta]:
        """The rank-one update for one request; the model is left unchanged."""
        if len(requests) != 1:
            raise EditError(None, f"{self.name} edits one fact at a time, got {len(requests)}")
        req = requests[0]
        hp = self.hparams
        name = env.arch.rewrite_name(hp.layer)
        module = get_module(model, name)
        stats = env.stats.get(hp.layer) if hp.mom2_adjustment else None

        ks = keys_at_subject(model, tok, name, req, env.templates)
        k_u, k_bar = ks.unprefixed.double(), ks.mean.double()
        solve = stats.solve if stats is not None else (lambda x: x)
        c_inv_kbar = solve(k_bar)
        u = c_inv_kbar / c_inv_kbar.norm()

        target = target_for(model, tok, req, env, name, hp.target_settings())
        v_star = target.target.double()
        if self.consistent_keys:
            key, value = k_bar, ks.values.double().mean(0)
        else:
            key, value = k_u, ks.values[0].double()
        denom = float(key @ u)
        if not torch.isfinite(torch.tensor(denom)) or denom == 0.0:
            raise EditError(req.case_id, f"update denominator is {denom}")
        right_vec = (v_star - value) / denom

        w = weight_matrix(module)
        rec.log(layer=hp.layer,
                denominator=denom,
                denominator_consistent=float(k_bar @ u),
                denominator_unprefixed=float(k_u @ u),
                key_norm_unprefixed=float(k_u.norm()),
                key_norm_prefixed=float(ks.prefixed_mean.double().norm()),
                key_cosine=float(torch.nn.functional.cosine_similarity(k_u, k_bar, dim=0)),
                key_mahalanobis_unprefixed=float((k_u @ solve(k_u)).clamp_min(0).sqrt()),
                key_mahalanobis_prefixed=float((ks.prefixed_mean.double() @ solve(ks.prefixed_mean.double()))
                                               .clamp_min(0).sqrt()),
                **target_signals([target]))
        return [Delta(module=name, layer=hp.layer, left=right_vec.to(w.dtype)[:, None],
                      right=u.to(w.dtype)[:, None])]


class RRome(Rome):
    """r-ROME: the prefix-averaged key k̄ (and mean value v̄) in every term."""

    name: ClassVar[str] = "r-rome"
    consistent_keys: ClassVar[bool] = True

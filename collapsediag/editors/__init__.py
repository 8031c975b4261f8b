"""Editing methods, registered by name."""
from __future__ import annotations

from typing import Any

from ..errors import CollapseDiagError
from .base import AppliedDeltas, Delta, EditEnv, Editor, HParams, apply_deltas
from .alphaedit import AlphaEdit, AlphaEditHParams
from .d4s import D4s, D4sHParams
from .encore import Encore, EncoreHParams
from .memit import Emmet, EmmetHParams, Memit, MemitHParams
from .rome import Rome, RomeHParams, RRome

EDITORS: dict[str, type] = {"rome": Rome, "r-rome": RRome, "memit": Memit, "emmet": Emmet, "d4s": D4s,
                            "alphaedit": AlphaEdit, "encore": Encore}


def get_editor(name: str, hparams: dict[str, Any] | None = None) -> Editor:
    """An editor instance by registry name, with hyper-parameters from a dict."""
    try:
        cls = EDITORS[name]
    except KeyError:
        raise CollapseDiagError(f"unknown editor {name!r}; known: {sorted(EDITORS)}") from None
    hp = cls.HParams.from_dict(hparams or {})
    if hasattr(hp, "target_settings"):
        hp.target_settings()  # a bad value (e.g. mpes=1.5) fails here, not in every edit's status
    return cls(hp)


__all__ = ["EDITORS", "AlphaEdit", "AlphaEditHParams", "AppliedDeltas", "D4s", "D4sHParams", "Delta", "EditEnv",
           "Editor", "Emmet", "Encore", "EncoreHParams", "EmmetHParams", "HParams", "Memit", "MemitHParams", "Rome", "RomeHParams", "RRome",
           "apply_deltas", "get_editor"]

"""The pre-edit guard: each request's key geometry read before its edit is made, and a rule on it.

Before an update, every request is scanned on the current weights at the editor's first edited layer
(``signals.scan``: k_uᵀû, k̄ᵀû, cos(k_u, k̄), the subject's position), and the rule marks it risky when ROME's
update for it would be far larger than the prefix-consistent one: denominator_ratio = k_uᵀû / k̄ᵀû below
``min_ratio`` (ROME's ‖ΔW‖ ∝ 1/k_uᵀû, r-ROME's ∝ 1/k̄ᵀû). ``warn`` records the warning (table ``guard``)
and makes the edit; ``skip`` leaves the request out of the update, its ``edits`` row saying why.

The default ``min_ratio`` was chosen on the 45 ROME edits made each alone on the unedited SmolLM2-135M
(benchmarks/results/disabling_edits.csv): the three that raised perplexity ×1.9 or more had ratios
0.0031, 0.0188 and 0.0194; the random sample's median is 0.76. 0.05 (an update 20× the consistent one)
sits above all three with room, and below every random-sample record.

>>> s = EditSession(model, tok, get_editor("rome"), guard=Guard("warn"))
>>> s.run(records); s.guard_rows                # one row per request, ``risky`` and ``action``
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CollapseDiagError

if TYPE_CHECKING:
    from ..requests import EditRequest
    from .session import EditSession

GUARD_MODES = ("warn", "skip")
MIN_RATIO = 0.05


@dataclass(frozen=True)
class Guard:
    """A pre-edit guard: ``mode`` warn or skip, and the rule's threshold on k_uᵀû / k̄ᵀû."""

    mode: str = "warn"
    min_ratio: float = MIN_RATIO

    def __post_init__(self) -> None:
        if self.mode not in GUARD_MODES:
            raise CollapseDiagError(f"guard mode must be one of {', '.join(GUARD_MODES)}, got {self.mode!r}")
        if not (self.min_ratio > 0 and math.isfinite(self.min_ratio)):
            raise CollapseDiagError(f"guard min_ratio must be a positive number, got {self.min_ratio}")

    def config(self) -> dict[str, Any]:
        """What a run's config records (``Guard(**config)`` rebuilds it)."""
        return asdict(self)

    def reason(self, row: dict[str, Any]) -> str | None:
        """Why the request in a guard row is risky, or None."""
        ratio = row.get("denominator_ratio")
        if ratio is None or ratio != ratio:  # NaN: the scan could not read its keys
            return None
        if abs(ratio) < self.min_ratio:
            return (f"k_uᵀû / k̄ᵀû = {ratio:.3g} < {self.min_ratio:g}: ROME's update would be "
                    f"{1 / max(abs(ratio), 1e-12):.0f}× the prefix-consistent one (cos(k_u, k̄) = "
                    f"{row.get('key_cosine', float('nan')):.2f}, subject first: {row.get('subject_first_token')})")
        return None

    def screen(self, session: "EditSession", requests: list[tuple[int, "EditRequest"]]) -> list[dict[str, Any]]:
        """One guard row per (edit_index, request), read on the session's current weights before the update."""
        from ..editors.rome import Rome
        from ..signals.scan import scan

        if not requests:
            return []
        layer = session.layers[0]
        editor = session.editor if isinstance(session.editor, Rome) else "rome"
        df = scan(session.model, session.tok, [q for _, q in requests], layer, editor=editor,
                  stats={layer: session.env.stats[layer]} if layer in session.env.stats else {},
                  templates=session.env.templates, arch=session.arch, progress=False)
        df = df.sort_values("record_index")
        rows = []
        for (index, _), rec in zip(requests, df.to_dict("records")):
            row = {"edit_index": index, "case_id": str(rec["case_id"]), "layer": int(layer),
                   **{k: _plain(rec[k]) for k in ("denominator", "denominator_consistent", "denominator_ratio",
                                                 "key_cosine", "subject_first_token", "subject_last_position")}}
            why = self.reason(row)
            row.update(risky=why is not None, reason=why,
                       action=("skipped" if self.mode == "skip" else "warned") if why else "none")
            rows.append(row)
        return rows


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v

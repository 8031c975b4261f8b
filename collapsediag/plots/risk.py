"""The pre-edit risk scan (``collapsediag.signals.scan``): each record's key geometry, the confirmed collapses marked."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from .style import axes_or_new, label_points, legend_outside, log_if_wide, plain_log_ticks, short_label

def _confirmed_rows(df: pd.DataFrame, confirmed: Any) -> pd.Series:
    """Boolean mask of ``df``'s rows named by ``confirmed``: a frame (rows with ``disabling`` true where it
    has that column) matched on ``case_id`` or else ``record_index``, or case ids (str) and record indices
    (int)."""
    if confirmed is None:
        return pd.Series(False, index=df.index)
    if isinstance(confirmed, pd.DataFrame):
        if "disabling" in confirmed.columns:
            confirmed = confirmed[confirmed["disabling"].astype(bool)]
        if "case_id" in confirmed.columns:
            return df["case_id"].astype(str).isin(set(confirmed["case_id"].astype(str)))
        if "record_index" in confirmed.columns:
            return df["record_index"].isin(set(confirmed["record_index"].astype(int)))
        raise ValueError("confirmed: the frame needs a case_id or record_index column")
    if isinstance(confirmed, (str, int, np.integer)):
        confirmed = [confirmed]
    ids = {str(c) for c in confirmed if isinstance(c, str)}
    idx = {int(c) for c in confirmed if not isinstance(c, str)}
    return df["case_id"].astype(str).isin(ids) | df["record_index"].isin(idx)


def plot_risk_scan(scan_df: pd.DataFrame, confirmed: Any = None, ax: Axes | None = None) -> Axes:
    """A pre-edit risk scan (``collapsediag.signals.scan.scan``): ROME's denominator k_uᵀu against cos(k_u, k̄), one
    point per record scanned with status ``ok``; marker: whether the subject is the prompt's first token.

    k_uᵀu is the ``denominator`` column of a ROME scan and ``denominator_ratio`` × ``denominator_consistent``
    of an r-ROME one. Its axis is logarithmic when the values span more than a decade (symmetric-log when
    some are ≤ 0), as its label says. ``confirmed``: collapses confirmed by applying the edit (a frame with
    ``case_id`` or ``record_index`` and optionally a boolean ``disabling``; or a set of case ids / record
    indices), marked with a red X and labelled with their case id. A scan of several layers (``collapsediag
    scan --layers``) is drawn at its first layer.
    """
    ax = axes_or_new(ax)
    df = scan_df[scan_df["status"].astype(str) == "ok"]
    if "layer" in df.columns and df["layer"].nunique() > 1:  # a multi-layer scan: one layer per figure
        df = df[df["layer"] == df["layer"].min()]
    if scan_df.attrs.get("editor", "rome") != "rome" and {"denominator_ratio", "denominator_consistent"} <= set(df):
        k_u = df["denominator_ratio"].to_numpy(float) * df["denominator_consistent"].to_numpy(float)
    else:
        k_u = df["denominator"].to_numpy(float)
    first = df["subject_first_token"].astype("boolean")
    d = pd.DataFrame({"key_cosine": df["key_cosine"].to_numpy(float), "k_u": k_u,
                      "subject starts the prompt": np.where(first.isna(), "unknown",
                                                            np.where(first.fillna(False), "yes", "no")),
                      "case_id": df["case_id"].astype(str).to_numpy(),
                      "confirmed": _confirmed_rows(df, confirmed).to_numpy(bool)})
    d = d[np.isfinite(d["key_cosine"]) & np.isfinite(d["k_u"])].reset_index(drop=True)
    styles = [s for s in ("no", "yes", "unknown") if s in set(d["subject starts the prompt"])]
    small = len(d) <= 200
    sns.scatterplot(d, x="key_cosine", y="k_u", style="subject starts the prompt", style_order=styles,
                    markers={"no": "o", "yes": "^", "unknown": "s"}, color="C0", s=22 if small else 10,
                    alpha=0.8 if small else 0.5, edgecolor="none", ax=ax)
    c = d[d["confirmed"]]
    extra = []
    if len(c):
        ax.scatter(c["key_cosine"], c["k_u"], marker="X", s=70, color="red", edgecolors="white", linewidths=0.5,
                   zorder=5, label="_confirmed", gid="confirmed")
        marked = list(zip(c["key_cosine"], c["k_u"], c["case_id"].map(lambda x: short_label(x, 24)), ["red"] * len(c)))
        extra.append((Line2D([], [], ls="", marker="X", color="red", markersize=7), "confirmed collapse"))
    scale = ""
    y = np.abs(d["k_u"].to_numpy(float))
    if len(d) and (d["k_u"] <= 0).any() and y.max() > 10 * max(y[y > 0].min(initial=np.inf), 1e-12):
        small = max(y[y > 0].min(initial=y.max()), y.max() * 1e-3)
        thresh = float(10.0 ** np.floor(np.log10(small)))  # a power of ten: ticks land on decades
        ax.set_yscale("symlog", linthresh=thresh)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        scale = f";\nsymlog scale, linear within ±{thresh:g}"
    elif log_if_wide(ax, d["k_u"]):
        plain_log_ticks(ax)
        scale = ", log scale"
    if len(c):
        label_points(ax, marked)
    ax.set_xlabel("cos(k_u, k̄): unprefixed vs prefix-averaged key")
    ax.set_ylabel(f"ROME denominator k_uᵀu (key units{scale})")
    layer = int(df["layer"].iloc[0]) if "layer" in df.columns and len(df) else scan_df.attrs.get("layer")
    ax.set_title(f"Pre-edit risk scan{f', layer {layer}' if layer is not None else ''} ({len(d)} records)")
    legend_outside(ax, extra)
    return ax


# No creation date or version: an unchanged figure is written as the same bytes.

"""A live view of an editing session in Jupyter: ``EditSession.run(records, live=True)``.

One small panel per quantity (update denominator, update norm ‖ΔW‖_F, weight norm ‖W‖_F, one line per
edited layer; held-out perplexity at the checkpoints), edit index on x, redrawn in place after every
batch. Outside a notebook nothing is drawn (``in_notebook()`` is False) and only the progress bar shows.

>>> view = LiveView(session)   # session: an EditSession
>>> session.edit(record); view.update()
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from .session import EditSession

# (column of the session's rows, panel title); the last one comes from the checkpoints (eval_rows)
PANELS = (("denominator", "update denominator"), ("delta_fro", "update norm ‖ΔW‖_F"),
          ("weight_fro", "weight norm ‖W‖_F"), ("perplexity", "held-out perplexity"))
STYLE = {"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "axes.spines.top": False,
         "axes.spines.right": False, "lines.linewidth": 1.4}


def in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session that can display figures; False in scripts, a plain
    Python or terminal IPython shell, or without IPython installed."""
    try:
        import IPython.display  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _display(obj: Any) -> Any:
    """Show ``obj`` in the notebook; returns the handle whose ``update(obj)`` redraws it in place."""
    from IPython.display import display

    return display(obj, display_id=True)


def _png(fig: Figure) -> Any:
    """The figure as an IPython PNG image (the same picture whatever matplotlib backend is active)."""
    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return Image(data=buf.getvalue(), format="png")


class LiveView:
    """A figure of ``session``'s in-memory rows, redrawn by ``update()`` (shown in the notebook when ``show``).

    ``show`` defaults to ``in_notebook()``; with ``show=False`` ``update()`` only redraws ``fig`` (for tests
    or to save it).
    """

    def __init__(self, session: "EditSession", show: bool | None = None) -> None:
        self.session = session
        self.show = in_notebook() if show is None else bool(show)
        with matplotlib.rc_context(STYLE):
            self.fig = Figure(figsize=(3.2 * len(PANELS), 2.6), layout="constrained")
            self.axes = list(self.fig.subplots(1, len(PANELS)))
        self.handle: Any = None
        self.n_updates = 0
        self._seen: tuple[int, int, int] | None = None

    def _counts(self) -> tuple[int, int, int]:
        s = self.session
        return len(s.edits), len(s.layer_rows), len(s.eval_rows)

    def draw(self) -> Figure:
        """Redraw every panel from the session's rows; returns the figure."""
        s = self.session
        with matplotlib.rc_context(STYLE):
            for ax, (col, title) in zip(self.axes, PANELS):
                ax.clear()
                ax.set_title(title)
                ax.set_xlabel("edit index")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if col == "perplexity":
                    self._draw_perplexity(ax)
                else:
                    self._draw_layers(ax, col)
            self.fig.suptitle(f"{s.editor.name}: {s.n_edits} edits, {s.n_batches} updates", fontsize=9)
        return self.fig

    def _draw_layers(self, ax: Any, col: str) -> None:
        rows = self.session.layer_rows
        if not rows:
            note = "no per-layer signals (diagnostics off)" if not self.session.diagnostics else "no edits yet"
            return _note(ax, note)
        if all(np.isnan(_value(r, col)) for r in rows):
            return _note(ax, f"no {col} for {self.session.editor.name}")
        for layer in sorted({r["layer"] for r in rows}):
            mine = [r for r in rows if r["layer"] == layer]
            ax.plot([r["edit_index"] for r in mine], [_value(r, col) for r in mine],
                    marker="o", markersize=3, label=f"layer {layer}")
        if col == "delta_fro":
            ax.legend(frameon=False)

    def _draw_perplexity(self, ax: Any) -> None:
        rows = [r for r in self.session.eval_rows if not np.isnan(_value(r, "perplexity"))]
        if not rows:
            return _note(ax, "no checkpoints yet" if self.session.eval_every else "no checkpoints (eval_every=0)")
        ax.plot([r["edit_index"] for r in rows], [r["perplexity"] for r in rows], marker="o", markersize=3,
                color="0.2")

    def update(self) -> None:
        """Redraw from the session's rows and, when shown, replace the notebook's picture in place."""
        self.draw()
        self.n_updates += 1
        self._seen = self._counts()
        if not self.show:
            return
        image = _png(self.fig)
        if self.handle is None:
            self.handle = _display(image)
        else:
            self.handle.update(image)

    def close(self) -> None:
        """Draw once more if rows came in since the last update (e.g. the final checkpoint), then let go of
        the display; the last picture stays in the notebook."""
        if self._seen is not None and self._seen != self._counts():
            self.update()
        self.handle = None


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def _value(row: dict[str, Any], col: str) -> float:
    value = row.get(col)
    return float("nan") if value is None else float(value)

"""The live notebook view of a session (collapsediag.runs.live) on a tiny model, drawn with Agg."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from collapsediag import EditSession, get_editor
from collapsediag.runs import live
from tests.conftest import make_model

RECORDS = [
    {"case_id": "a", "subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is",
     "target_new": "English", "target_true": "French"},
    {"case_id": "b", "subject": "Angola", "prompt": "{} is located in", "target_new": "Italy",
     "target_true": "Africa"},
    {"case_id": "c", "subject": "Toko Yasuda", "prompt": "{} plays the", "target_new": "piano",
     "target_true": "guitar"},
]
TEXTS = ["The city of music is known in history.", "They said the river was located in the old country."]


def _session(tok, env_for, tmp_path, eval_every: int = 1) -> EditSession:
    model = make_model("gpt2", len(tok))
    env = env_for(model, [1], tmp_path)
    return EditSession(model, tok, get_editor("rome", {"layer": 1, "v_num_grad_steps": 3}), stats=env.stats,
                       templates=env.templates, eval_every=eval_every, eval_texts=TEXTS, generation_prompts=[],
                       progress=False)


def _panel(view: live.LiveView, title_part: str):
    (ax,) = [ax for ax in view.axes if title_part in ax.get_title()]
    return ax


def test_view_draws_one_point_per_edit_and_the_checkpoints(tok, env_for, tmp_path):
    s = _session(tok, env_for, tmp_path)
    view = live.LiveView(s, show=False)
    assert not view.show  # no IPython kernel under pytest
    for n, record in enumerate(RECORDS, start=1):
        assert s.edit(record)["status"] == "ok"
        view.update()
        assert [ax.get_title() for ax in view.axes] == [title for _, title in live.PANELS]
        for col, title in live.PANELS[:3]:
            (line,) = _panel(view, title).get_lines()  # one edited layer, one line
            assert list(line.get_xdata()) == list(range(n))
            assert np.allclose(line.get_ydata(), [r[col] for r in s.layer_rows])
        (ppl,) = _panel(view, "perplexity").get_lines()
        assert list(ppl.get_xdata()) == list(range(-1, n))  # the unedited baseline, then every edit
        assert np.allclose(ppl.get_ydata(), [r["perplexity"] for r in s.eval_rows])
        assert all(math.isfinite(v) for v in ppl.get_ydata())
    assert view.n_updates == len(RECORDS)
    view.fig.canvas.draw()  # renders with Agg
    assert view.axes[0].xaxis.get_major_locator()._integer


def test_missing_denominator_and_no_checkpoints_leave_notes():
    rows = [{"edit_index": i, "layer": 3, "denominator": float("nan"), "delta_fro": 1.0 + i, "weight_fro": 5.0}
            for i in range(2)]
    s = SimpleNamespace(layer_rows=rows, eval_rows=[], edits=[{}, {}], n_edits=2, n_batches=2, eval_every=0,
                        diagnostics=True, editor=SimpleNamespace(name="memit"))
    view = live.LiveView(s, show=False)
    view.update()
    den, ppl = _panel(view, "denominator"), _panel(view, "perplexity")
    assert not den.get_lines() and "no denominator for memit" in den.texts[0].get_text()
    assert not ppl.get_lines() and "eval_every=0" in ppl.texts[0].get_text()
    assert len(_panel(view, "‖ΔW‖").get_lines()) == 1


def test_run_live_outside_a_notebook_draws_nothing(tok, env_for, tmp_path, monkeypatch):
    assert not live.in_notebook()
    made = []
    monkeypatch.setattr(live, "LiveView", lambda *a, **k: made.append(a))
    monkeypatch.setattr(live, "_display", lambda obj: pytest.fail("displayed outside a notebook"))
    s = _session(tok, env_for, tmp_path, eval_every=0)
    rows = s.run(RECORDS[:2], progress=False, live=True)
    assert [r["status"] for r in rows] == ["ok", "ok"] and made == []


def test_run_live_updates_the_display_once_per_batch(tok, env_for, tmp_path, monkeypatch):
    shown = []

    class Handle:
        def update(self, obj):
            shown.append(obj)

    def fake_display(obj):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(live, "in_notebook", lambda: True)
    monkeypatch.setattr(live, "_display", fake_display)
    s = _session(tok, env_for, tmp_path, eval_every=0)
    s.run(RECORDS, progress=False, live=True)
    assert len(shown) == s.n_batches == len(RECORDS)
    assert all(img.data[:8] == b"\x89PNG\r\n\x1a\n" for img in shown)

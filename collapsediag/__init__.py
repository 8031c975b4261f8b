"""collapsediag: why and when a language model breaks while its knowledge is edited.

The layout (docs/ARCHITECTURE.md): a flat core (arch, hooks, forward, tokens, linalg, models, requests, recorder,
stats, checks), then ``editors``, ``signals``, ``runs``, ``analysis``, ``plots``, ``experiments`` and ``cli``,
each importing only the ones before it.
"""
from __future__ import annotations

from ._version import __version__
from .arch import ArchSpec, arch_for
from .editors import EDITORS, Delta, apply_deltas, get_editor
from .errors import CollapseDiagError, EditError, ModelNotFoundError, RecordError
from .models import load_model
from .requests import EditRequest
from .runs.session import EditSession
from .runs.store import Run, load_run
from .runs.watch import watch
from .signals.scan import read_scan, scan, write_scan
from .stats import LayerStats, StatsCache, TextCorpus

__all__ = ["ArchSpec", "CollapseDiagError", "Delta", "EDITORS", "EditError", "EditRequest", "EditSession",
           "LayerStats", "ModelNotFoundError", "RecordError", "Run", "StatsCache", "TextCorpus", "__version__",
           "apply_deltas", "arch_for", "get_editor", "load_model", "load_run", "read_scan", "scan", "watch", "write_scan"]

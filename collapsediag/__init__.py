"""collapsediag: why and when a language model breaks while its knowledge is edited."""
from __future__ import annotations

__version__ = "0.1.0"

from .arch import ArchSpec, arch_for  # noqa: E402
from .editors import EDITORS, Delta, apply_deltas, get_editor  # noqa: E402
from .errors import CollapseDiagError, EditError, ModelNotFoundError, RecordError  # noqa: E402
from .models import load_model  # noqa: E402
from .requests import EditRequest  # noqa: E402
from .scan import read_scan, scan, write_scan  # noqa: E402
from .session import EditSession  # noqa: E402
from .stats import LayerStats, StatsCache, TextCorpus  # noqa: E402
from .store import Run, load_run  # noqa: E402
from .watch import watch  # noqa: E402

__all__ = ["ArchSpec", "CollapseDiagError", "Delta", "EDITORS", "EditError", "EditRequest", "EditSession",
           "LayerStats", "ModelNotFoundError", "RecordError", "Run", "StatsCache", "TextCorpus", "__version__",
           "apply_deltas", "arch_for", "get_editor", "load_model", "load_run", "read_scan", "scan", "watch", "write_scan"]

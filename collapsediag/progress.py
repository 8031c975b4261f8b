"""Progress bars: one switch for the whole package (the command line's ``-q`` turns them off)."""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

_enabled = True


def set_progress(enabled: bool) -> None:
    """Show (True) or hide (False) every progress bar collapsediag draws from now on."""
    global _enabled
    _enabled = bool(enabled)


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar, hidden when ``disable`` is set or progress bars are switched off."""
    return tqdm(iterable, disable=disable or not _enabled, **kwargs)

"""Saved runs: a directory of JSON Lines tables appended per edit, plus update factors.

>>> run = load_run("runs/rome-smollm2")
>>> run.layers.pivot(index="edit_index", columns="layer", values="weight_l1")
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import schema
from ..errors import CollapseDiagError


def _fsync_append(path: pathlib.Path, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
    """A temporary name beside ``path`` of this process's own (two processes may write the same file)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file moved into place)."""
    path = pathlib.Path(path)
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    """``v`` as plain JSON data: numpy/torch values unwrapped, NaN and ±inf (nested too) as None."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    elif isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _missing(v: Any) -> bool:
    """None, NaN or ±inf (a scalar that is written as null)."""
    return v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and not math.isfinite(v))


def dumps(v: Any, **kw: Any) -> str:
    """Strict JSON text of ``v``: not-finite numbers become ``null`` (never bare ``NaN``/``Infinity``)."""
    return json.dumps(_jsonable(v), allow_nan=False, **kw)


class RunWriter:
    """Appends rows to a run directory; every write is flushed to disk before it returns."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        (self.path / "factors").mkdir(parents=True, exist_ok=True)

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict[str, Any]) -> "RunWriter":
        """Start a new run directory; refuses to overwrite one that holds edits."""
        p = pathlib.Path(path)
        if (p / "edits.jsonl").exists() and (p / "edits.jsonl").stat().st_size > 0:
            raise CollapseDiagError(f"{p} already holds a run: choose another --out or use --resume")
        w = cls(p)
        w.write_config(config)
        atomic_write(p / "schema.json", dumps(schema.as_dict(), indent=1))
        return w

    def write_config(self, config: dict[str, Any]) -> None:
        """(Re)write config.json atomically."""
        atomic_write(self.path / "config.json", dumps(config, indent=2, default=str))

    def append(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Append rows to ``<table>.jsonl``."""
        if table not in schema.TABLES:
            raise CollapseDiagError(f"unknown table {table!r}")
        if rows:
            lines = [dumps(r) + "\n" for r in rows]
            _fsync_append(self.path / f"{table}.jsonl", lines)

    def rewrite(self, table: str, df: pd.DataFrame) -> None:
        """Replace ``<table>.jsonl`` by the rows of ``df`` (atomic; used when resuming)."""
        ints = {c.name for c in schema.TABLES[table] if c.dtype == "int"}
        rows = [{k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v
                 for k, v in r.items() if not _missing(v)}
                for r in df.to_dict("records")]  # missing values left out, as in appended rows
        atomic_write(self.path / f"{table}.jsonl", "".join(dumps(r) + "\n" for r in rows))

    def save_snapshot(self, edit_index: int, weights: dict[str, np.ndarray]) -> None:
        """Store the edited matrices after ``edit_index`` (``w_<layer>``, Linear orientation), so that
        ``model_at`` starts from the nearest snapshot instead of replaying every update (atomic)."""
        d = self.path / "snapshots"
        d.mkdir(exist_ok=True)
        p = d / f"edit_{edit_index:06d}.npz"
        tmp = p.with_name(p.stem + ".tmp.npz")
        np.savez(tmp, **weights)
        os.replace(tmp, p)

    def save_factors(self, batch_index: int, factors: dict[str, np.ndarray]) -> None:
        """Store the update factors (and editor state arrays) of one batch (atomic)."""
        p = self.path / "factors" / f"batch_{batch_index:06d}.npz"
        tmp = p.with_name(p.stem + ".tmp.npz")
        np.savez(tmp, **factors)
        os.replace(tmp, p)


COLUMNAR_MIN_BYTES = 1 << 20  # a table's JSON Lines file this large gets a parquet copy when read


def _parse_lines(text: str, p: pathlib.Path, first_line: int = 0) -> list[dict]:
    records = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{p}: skipped incomplete line {first_line + i + 1} (crash while writing?)", stacklevel=3)
    return records


def _columnar_path(p: pathlib.Path) -> pathlib.Path:
    return p.parent / "columnar" / (p.stem + ".parquet")


def _read_columnar(p: pathlib.Path, data: bytes) -> tuple[pd.DataFrame | None, int]:
    """The parquet copy of the first bytes of ``p`` and how many bytes it covers, if it is still a copy of
    them (a resume that rewrote the table makes it stale)."""
    import hashlib

    import pyarrow.parquet as pq

    cp = _columnar_path(p)
    if not cp.exists():
        return None, 0
    try:
        table = pq.read_table(cp)
        meta = json.loads(table.schema.metadata[b"collapsediag"])
        covered = int(meta["bytes"])
        if covered > len(data) or hashlib.blake2b(data[:covered]).hexdigest() != meta["blake2b"]:
            return None, 0
        return table.to_pandas(), covered
    except Exception:  # noqa: BLE001 - a broken copy is never worse than no copy
        return None, 0


def _write_columnar(p: pathlib.Path, df: pd.DataFrame, data: bytes, covered: int) -> None:
    """Store ``df`` (the rows of ``data[:covered]``) as parquet next to the run's tables (atomic)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    cp = _columnar_path(p)
    try:
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = {b"collapsediag": json.dumps({"bytes": covered,
                                             "blake2b": hashlib.blake2b(data[:covered]).hexdigest()}).encode()}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
        cp.parent.mkdir(exist_ok=True)
        tmp = _tmp_path(cp)  # the study's two processes may both read (and so copy) one run
        pq.write_table(table, tmp)
        os.replace(tmp, cp)
    except (OSError, pa.ArrowException, TypeError, ValueError) as exc:  # mixed-type column, read-only dir
        warnings.warn(f"{p}: no parquet copy written ({exc})", stacklevel=3)


def read_table(path: str | os.PathLike, table: str, columnar: bool = True) -> pd.DataFrame:
    """A run table with every documented column; a line cut by a crash is skipped with a warning.

    The JSON Lines file is the record. When it is larger than ``COLUMNAR_MIN_BYTES``, reading it also leaves a
    parquet copy of its complete lines under ``columnar/``; later reads take the rows it covers from that copy
    (after checking that those bytes did not change) and parse only the lines appended since.
    """
    p = pathlib.Path(path) / f"{table}.jsonl"
    data = p.read_bytes() if p.exists() else b""
    head, covered = _read_columnar(p, data) if columnar and len(data) >= COLUMNAR_MIN_BYTES else (None, 0)
    tail = data[covered:].decode("utf-8")
    records = _parse_lines(tail, p)
    if head is None and columnar and len(data) >= COLUMNAR_MIN_BYTES:
        complete = data.rfind(b"\n") + 1  # a last line cut by a crash stays out of the copy
        n_complete = len(_parse_lines(data[:complete].decode("utf-8"), p)) if complete < len(data) else len(records)
        df = pd.DataFrame.from_records(records[:n_complete])
        if len(df):
            _write_columnar(p, _coerce(_with_columns(df, table), table), data, complete)
    frames = [f for f in (head, pd.DataFrame.from_records(records)) if f is not None and len(f)]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else pd.DataFrame())
    return _coerce(_with_columns(df, table), table)


def _with_columns(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """``df`` with every schema column (NaN where absent), schema columns first."""
    cols = schema.columns(table)
    for c in cols:
        if c not in df.columns:
            df[c] = np.nan
    extra = [c for c in df.columns if c not in cols]
    return df[cols + extra]


def _coerce(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Numeric columns as numbers with NaN for ``null`` (JSON null reads as None, which makes object columns).

    Float columns become float; int columns stay int unless values are missing (then float); bool and str
    columns keep their values, with NaN for null as for a left-out key. A column outside the schema whose
    values are all numbers becomes float.
    """
    dtypes = {c.name: c.dtype for c in schema.TABLES[table]}
    for c in df.columns:
        kind = dtypes.get(c)
        if df[c].dtype != object:
            continue
        if kind in ("bool", "str"):
            df[c] = df[c].map(lambda v: np.nan if v is None else v)  # null reads like a left-out key
            continue
        values = df[c].dropna()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if kind in ("int", "float") or (numeric and len(values)):
            try:
                df[c] = pd.to_numeric(df[c]).astype(float) if kind != "int" else pd.to_numeric(df[c])
            except (ValueError, TypeError):
                pass  # a value that is not a number: leave the column as read
    return df


def complete_batches(edits: pd.DataFrame, path: object = "") -> pd.DataFrame:
    """``edits`` without a last batch cut short by a crash (fewer rows than its ``batch_size``)."""
    if edits.empty or edits["batch_size"].isna().all():
        return edits
    counts = edits.groupby("batch_index")["edit_index"].transform("count")
    keep = counts >= edits["batch_size"].fillna(1)
    if not keep.all():
        warnings.warn(f"{path}: dropped {int((~keep).sum())} edits of an unfinished batch", stacklevel=3)
    return edits[keep].reset_index(drop=True)


ALONE = "alone"  # config mode of a run whose edits were each made alone on the unedited model


class Run:
    """A saved run: ``config`` (dict) and the tables ``edits``, ``layers``, ``evals``, ``retention``,
    ``downstream`` and ``guard``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise CollapseDiagError(f"{self.path} is not a collapsediag run (no config.json)")
        self.config: dict[str, Any] = json.loads(cfg.read_text(encoding="utf-8"))
        self.edits = complete_batches(read_table(self.path, "edits"), self.path)
        done = set(self.edits["edit_index"].dropna().astype(int))
        layers = read_table(self.path, "layers")
        self.layers = layers[layers["edit_index"].isin(done)].reset_index(drop=True)
        self.evals = read_table(self.path, "evals")
        self.retention = read_table(self.path, "retention")
        self.downstream = read_table(self.path, "downstream")  # empty without --downstream
        guard = read_table(self.path, "guard")  # empty without --guard; rows of edits made or left out
        self.guard = guard[guard["edit_index"].isin(done)].reset_index(drop=True)

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, editor={self.config.get('editor')!r}, "
                f"edits={len(self.edits)})")

    def __getitem__(self, key: tuple[str, int]) -> pd.Series:
        """``run["weight_l1", 5]``: one layer metric as a Series over edit_index."""
        metric, layer = key
        rows = self.layers[self.layers["layer"] == layer]
        return rows.set_index("edit_index")[metric]

    @property
    def made_alone(self) -> bool:
        """Whether each edit was made alone on the unedited model (``validate.edit_each_alone``): then
        ``model_at(i)`` is the unedited model plus edit i, and the run cannot be resumed."""
        return self.config.get("mode") == ALONE

    def factors_file(self, batch_index: int) -> pathlib.Path | None:
        """The factors file of one batch on disk (``edit_*`` in runs written before batches existed), or None."""
        for name in (f"batch_{batch_index:06d}.npz", f"edit_{batch_index:06d}.npz"):
            if (self.path / "factors" / name).exists():
                return self.path / "factors" / name
        return None

    def has_factors(self, batch_index: int) -> bool:
        """Whether the factors file of one batch is on disk."""
        return self.factors_file(batch_index) is not None

    def factors(self, batch_index: int) -> dict[str, np.ndarray]:
        """The stored arrays of one batch (of one edit in a sequential run): ``left_<layer>``,
        ``right_<layer>`` and, for stateful editors, ``state_*``."""
        p = self.factors_file(batch_index) or self.path / "factors" / f"batch_{batch_index:06d}.npz"
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def snapshots(self) -> list[int]:
        """Edit indices with a stored weight snapshot, ascending."""
        d = self.path / "snapshots"
        stems = [p.name[len("edit_"):-len(".npz")] for p in d.glob("edit_*.npz")] if d.exists() else []
        return sorted(int(s) for s in stems if s.isdigit())

    def snapshot_file(self, edit_index: int) -> pathlib.Path:
        """Where the snapshot after ``edit_index`` is (or would be) stored."""
        return self.path / "snapshots" / f"edit_{edit_index:06d}.npz"

    def snapshot(self, edit_index: int) -> dict[int, np.ndarray]:
        """The edited matrices stored after ``edit_index``, by layer."""
        with np.load(self.snapshot_file(edit_index)) as z:
            return {int(k[2:]): z[k] for k in z.files if k.startswith("w_")}

    def model_at(self, edit_index: int, model: Any = None) -> Any:
        """The model as it was right after ``edit_index``, rebuilt from the stored update factors.

        The edits of one batch land together: inside a batch this is the model after the whole batch.
        It starts from the nearest weight snapshot at or before the edit (``snapshot_every``) and replays only
        the updates after it.

        ``model`` is the unedited base model (loaded from ``config["model"]`` when omitted); it is
        edited in place and returned.
        """
        from ..models import load_model
        from .rebuild import apply_run

        if model is None:
            model, _ = load_model(self.config["model"])
        return apply_run(model, self, edit_index)


def load_run(path: str | os.PathLike) -> Run:
    """Open a saved run directory."""
    return Run(path)

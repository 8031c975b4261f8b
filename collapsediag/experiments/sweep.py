"""Sweeps: a grid of runs from a TOML spec, made one after another, in worker processes, or as Ray tasks.

SPEC.toml::

    [defaults]                      # every cell (any `collapsediag run` option, by its long name)
    data = "counterfact:data/counterfact.json"
    n_edits = 20
    eval_every = 10

    [grid]                          # list values multiply out: 2 × 2 = 4 cells
    editor = ["rome", "r-rome"]
    seed = [0, 1]
    # also: model, layers (a list of lists), mode, batch_size, n_edits, data, hparams (a list of tables)

    [resources]                     # what a Ray task asks for
    cpus_per_run = 1
    gpus_per_run = 0

Each cell is one `collapsediag run` in ``OUT/<key>-<value>_...`` (named from its grid values). A sweep run again
skips finished cells and resumes unfinished ones (``--resume``), so a killed worker loses at most the edit it
was making. ``sweep.json`` in OUT lists the cells and their grid values, for ``collapsediag report OUT``.
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CollapseDiagError

GRID_KEYS = {"model", "editor", "layers", "mode", "batch_size", "seed", "n_edits", "data", "hparams", "eval_every",
             "retention_sample", "dtype", "device"}


@dataclass
class Cell:
    """One run of a sweep: its directory name and its option values."""

    name: str
    values: dict[str, Any]  # the grid's values of this cell
    options: dict[str, Any] = field(default_factory=dict)  # defaults + values

    def command(self, out: pathlib.Path) -> list[str]:
        """The ``collapsediag run`` command line of this cell (``--resume`` continues or starts it)."""
        args = [sys.executable, "-m", "collapsediag", "-q", "run", "--out", str(out / self.name)]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if key == "hparams":
                for k, v in (value or {}).items():
                    args += ["--hparam", f"{k}={json.dumps(v)}"]
            elif key == "layers":
                args += [flag] + [str(x) for x in (value if isinstance(value, list) else [value])]
            elif isinstance(value, bool):
                args += [flag] if value else []
            elif value is not None:
                args += [flag, str(value)]
        return args


def _slug(value: Any) -> str:
    if isinstance(value, dict):
        value = "+".join(f"{k}={v}" for k, v in sorted(value.items()))
    elif isinstance(value, list):
        value = ".".join(str(v) for v in value)
    text = re.sub(r"[^A-Za-z0-9=.+-]+", "-", str(value).rsplit("/", 1)[-1].split(":")[-1])
    return text.strip("-")[:60] or "x"


def read_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The spec's tables (``grid`` required); unknown grid keys are errors."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    p = pathlib.Path(path)
    try:
        spec = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CollapseDiagError(f"cannot read sweep spec {p}: {exc}") from None
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise CollapseDiagError(f"{p} has no [grid] table")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise CollapseDiagError(f"{p}: unknown grid keys {sorted(unknown)}; known: {sorted(GRID_KEYS)}")
    return spec


def cells(spec: dict[str, Any]) -> list[Cell]:
    """Every combination of the grid's values, in the order the grid lists them."""
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in spec["grid"].items()}
    defaults = dict(spec.get("defaults", {}))
    varying = [k for k, v in grid.items() if len(v) > 1] or list(grid)[:1]
    out, seen = [], set()
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = "_".join(f"{k}-{_slug(values[k])}" for k in varying)
        if name in seen:
            raise CollapseDiagError(f"two cells would share the directory {name!r}: give them distinct values")
        seen.add(name)
        out.append(Cell(name=name, values=values, options={**defaults, **values}))
    return out


def cell_done(out: pathlib.Path, cell: Cell) -> bool:
    """Whether the cell's run holds all its edits (and, with checkpoints, its last one)."""
    from ..runs.store import load_run

    p = out / cell.name
    if not (p / "config.json").exists():
        return False
    run = load_run(p)
    n = run.config.get("n_edits") or cell.options.get("n_edits")
    if not n or len(run.edits) < int(n):
        return False
    every = int(run.config.get("eval_every") or 0)
    return not every or (len(run.evals) and int(run.evals["edit_index"].max()) == len(run.edits) - 1)


def _die_with_parent() -> None:
    """In the cell's process: be killed when the worker that started it dies (a lost Ray worker must not leave
    a run writing beside the retried one)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def run_cell(out: str, cell: Cell, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Make or continue one cell (a ``collapsediag run`` subprocess); returns its name, seconds and exit code."""
    out_p = pathlib.Path(out)
    if cell_done(out_p, cell):
        return {"cell": cell.name, "skipped": True, "returncode": 0, "seconds": 0.0}
    args = cell.command(out_p)
    if (out_p / cell.name / "config.json").exists():
        args.append("--resume")  # the run's own settings win; --data and --n-edits must agree with them
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    if proc.returncode != 0:
        (out_p / f"{cell.name}.err").write_text(proc.stderr, encoding="utf-8")
    return {"cell": cell.name, "skipped": False, "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1)}


def write_index(out: pathlib.Path, spec: dict[str, Any], all_cells: list[Cell]) -> None:
    """``sweep.json``: the grid keys and every cell's values (what ``collapsediag report`` groups by)."""
    out.mkdir(parents=True, exist_ok=True)
    index = {"grid": list(spec["grid"]), "cells": {c.name: c.values for c in all_cells}}
    (out / "sweep.json").write_text(json.dumps(index, indent=1, default=str), encoding="utf-8")


def run_local(out: str | os.PathLike, all_cells: list[Cell], workers: int = 1) -> list[dict[str, Any]]:
    """The cells one after another, or in ``workers`` processes at once (each with OMP_NUM_THREADS shared out)."""
    from concurrent.futures import ThreadPoolExecutor

    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))} if workers > 1 else {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda c: run_cell(str(out), c, env), all_cells))


def run_ray(out: str | os.PathLike, all_cells: list[Cell], resources: dict[str, Any],
            address: str | None = None) -> list[dict[str, Any]]:
    """Each cell as a Ray task with ``cpus_per_run``/``gpus_per_run``; attaches to ``address`` (``auto`` or
    HOST:PORT) or starts a local cluster. A task whose worker dies is retried, and its run resumes."""
    try:
        import ray
    except ImportError:
        raise CollapseDiagError("--engine ray needs Ray: pip install -e '.[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    cpus, gpus = float(resources.get("cpus_per_run", 1)), float(resources.get("gpus_per_run", 0))
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=int(resources.get("max_retries", 3)))(run_cell)
    env = {"OMP_NUM_THREADS": str(max(1, int(cpus)))}
    try:
        return ray.get([task.remote(str(out), c, env) for c in all_cells])
    finally:
        if started:
            ray.shutdown()


def sweep(spec_path: str | os.PathLike, out: str | os.PathLike, engine: str = "local", workers: int = 1,
          address: str | None = None) -> list[dict[str, Any]]:
    """Run (or continue) the sweep of ``spec_path`` into ``out``; returns one result per cell."""
    spec = read_spec(spec_path)
    all_cells = cells(spec)
    out = pathlib.Path(out)
    write_index(out, spec, all_cells)
    if engine == "local":
        return run_local(out, all_cells, workers)
    if engine == "ray":
        return run_ray(out, all_cells, spec.get("resources", {}), address)
    raise CollapseDiagError(f"unknown engine {engine!r}: local or ray")


def sweep_runs(path: str | os.PathLike) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """The runs of a sweep directory (those with a config) and every cell's grid values."""
    from ..runs.store import load_run

    p = pathlib.Path(path)
    index = json.loads((p / "sweep.json").read_text(encoding="utf-8"))
    runs = [load_run(p / name) for name in index["cells"] if (p / name / "config.json").exists()]
    return runs, index["cells"]


def sweep_table(path: str | os.PathLike) -> "pd.DataFrame":
    """One row per cell of a sweep, its grid values first: edits, efficacy, final retention and perplexity,
    the largest weight_l1 growth over the edited layers and seconds per edit (cells not started: blank)."""
    import numpy as np
    import pandas as pd

    from ..analysis.report import summary

    runs, values = sweep_runs(path)
    by_name = {r.path.name: r for r in runs}
    rows = []
    for name, vals in values.items():
        row = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in vals.items()}
        run = by_name.get(name)
        if run is not None:
            s = summary(run)
            ev = run.evals.sort_values("edit_index")
            row.update(edits=len(run.edits), efficacy=float(s["efficacy"].iloc[0]),
                       retention_final=float(ev["retention"].dropna().iloc[-1]) if ev["retention"].notna().any()
                       else np.nan,
                       perplexity_final=float(ev["perplexity"].dropna().iloc[-1]) if ev["perplexity"].notna().any()
                       else np.nan,
                       weight_l1_growth_pct=float(s["weight_l1_growth_pct"].max()),
                       seconds_per_edit=float(s["seconds_per_edit"].iloc[0]))
        rows.append(dict(row, cell=name))
    df = pd.DataFrame(rows)
    keys = [k for k in json.loads((pathlib.Path(path) / "sweep.json").read_text())["grid"] if k in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True) if keys else df


def _is_run(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file()


def _runs_inside(path: pathlib.Path) -> list[pathlib.Path]:
    """The runs directly inside a folder, by name (none when it is not a folder)."""
    return sorted(c for c in path.iterdir() if c.is_dir() and _is_run(c)) if path.is_dir() else []


def run_dirs(dirs: list[str]) -> tuple[list[str], list[str]]:
    """The run directories that ``dirs`` name, and one note per folder left out.

    A run (with ``config.json``) stands for itself, a sweep directory (``sweep.json``) for the runs of its
    cells, and a folder of runs (such as the demo's ``runs/demo``) for the runs directly inside it, by name
    (its other folders, such as ``figures/``, are passed over). Anything else is left out with a note."""
    out: list[str] = []
    skipped: list[str] = []
    for d in dirs:
        p = pathlib.Path(d)
        if _is_run(p):
            out.append(d)
        elif (p / "sweep.json").exists():
            out += [str(r.path) for r in sweep_runs(d)[0]]
        elif inner := _runs_inside(p):
            out += [str(c) for c in inner]
        else:
            why = "no such folder" if not p.exists() else "no config.json, sweep.json or run folders inside"
            skipped.append(f"{d}: not a collapsediag run ({why}), skipped")
    return out, skipped


def expand_dirs(dirs: list[str]) -> list[str]:
    """The run directories of ``run_dirs`` (sweeps and folders of runs expanded, other folders left out)."""
    return run_dirs(dirs)[0]

"""The long study (issue 14): hundreds of sequential edits per editor on the same records, and the batch study.

Layout under ``out``:
  seq/<editor>/            one sequential run per editor (ROME, r-ROME, MEMIT, D4S, AlphaEdit, ENCORE)
  batch/<editor>-b<B>/     MEMIT and EMMET over the same first ``batch_edits`` records at batch size B
  study.json               the plan, the records' source and, per run, its wall time and edits per hour

The two parts (sequential runs, batch study) may run in separate processes at once (``parts``): the sequential
part in one at a time (``study.seq.lock``), the batch part in any number, each batch run locked while one process
makes it (``batch/<name>.lock``); study.json is updated under a shared lock.

Every run edits the same records in the same order. The sequential runs advance together, one checkpoint
interval at a time (round-robin), so whenever the study stops every editor has reached about the same edit;
each run is resumed on its own (``EditSession.resume``) the next time the study starts.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn

from ..editors import get_editor
from ..editors.context import generate_templates
from ..editors.target import TargetCache
from ..errors import CollapseDiagError
from ..signals.fluency import GENERATION_PROMPTS, heldout_texts
from ..progress import progress_bar
from ..runs.checkpoints import DEFAULT_SAMPLE
from ..runs.resume import fork_run
from ..runs.session import EditSession
from ..stats import StatsCache, TextCorpus
from ..runs.store import Run, atomic_write, dumps, load_run


@dataclass
class LongStudyPlan:
    """What the long study runs."""

    n_edits: int = 300
    editors: tuple[str, ...] = ("rome", "r-rome", "memit", "d4s", "alphaedit", "encore")
    eval_every: int = 25
    retention_sample: int = DEFAULT_SAMPLE
    batch_editors: tuple[str, ...] = ("memit", "emmet")
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    batch_edits: int = 256
    eval_passages: int = 32
    generation_prompts: int = 4
    seed: int = 0
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    def batch_runs(self) -> list[tuple[str, str, int]]:
        """(run name, editor, batch size) of the batch study."""
        return [(f"{e}-b{b}", e, b) for e in self.batch_editors for b in self.batch_sizes]


PARTS = ("seq", "batch")


def read_status(out: str | os.PathLike) -> dict[str, Any]:
    """study.json of the study in ``out`` (empty before the study starts)."""
    p = pathlib.Path(out) / "study.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def update_status(out: str | os.PathLike, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to study.json under its lock (read, change, write atomically), so that the two parts of a
    study running in two processes keep each other's entries; returns the new status."""
    out = pathlib.Path(out)
    with FileLock(str(out / "study.json.lock")):
        status = read_status(out)
        change(status)
        atomic_write(out / "study.json", dumps(status, indent=1, default=str))
    return status


def interval_end(done: int, every: int, n: int) -> int:
    """Where a run with ``done`` edits stops next: its next checkpoint (every ``every`` edits), at most ``n``."""
    return min(n, (done // every + 1) * every)


def run_timing(run: Run, first: int = 0, stop: int | None = None) -> dict[str, float]:
    """Wall time of a run's edits ``first``..``stop - 1`` (all by default) and of the checkpoints after them, as
    recorded; the median seconds per edit; and edits per hour from the median edit plus the checkpoints' share
    (robust to one edit timed across a suspended process). A range picks edits made in one setting, e.g. one
    sitting of the study at one thread count. A range from edit 0 also carries the unedited baseline's
    checkpoint, a one-off cost of starting the run."""
    end = np.inf if stop is None else stop
    idx = run.edits["edit_index"]
    edits = run.edits[(idx >= first) & (idx < end)]
    at = run.evals["edit_index"]
    in_range = (at >= first) & (at < end)  # the unedited baseline (-1) is not
    n = len(edits)
    evals = float(run.evals.loc[in_range, "seconds"].fillna(0).sum()) + \
        (float(run.evals.loc[at == -1, "seconds"].fillna(0).sum()) if first == 0 else 0.0)
    seconds = float(edits["seconds"].sum()) + evals
    median = float(edits["seconds"].median()) if n else 0.0
    per_edit = median + evals / n if n else 0.0
    return {"edits": n, "seconds": round(seconds, 1), "seconds_per_edit_median": round(median, 2),
            "edits_per_hour": round(3600 / per_edit, 1) if per_edit else 0}


class LongStudy:
    """Runs (or resumes) the long study of ``plan`` on ``records`` under ``out``."""

    def __init__(self, model: nn.Module, tok: object, records: list[dict[str, Any]], out: str | os.PathLike,
                 plan: LongStudyPlan, data: str = "", corpus: TextCorpus | None = None,
                 cache: StatsCache | None = None, stats_tokens: int = 100_000, progress: bool = True) -> None:
        self.model, self.tok, self.plan = model, tok, plan
        self.records = records
        self.out = pathlib.Path(out)
        self.corpus = corpus or TextCorpus.packaged()
        self.cache = cache or StatsCache()
        self.stats_tokens = stats_tokens
        self.progress = progress
        self.texts = heldout_texts(max_passages=plan.eval_passages)
        self.prompts = list(GENERATION_PROMPTS[:plan.generation_prompts])
        self.templates: dict[tuple, list[str]] = {}
        self.targets = TargetCache()  # batch runs start from W₀: their first targets are shared
        self.sitting: dict[str, Any] | None = None
        self._t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)

        def start(status: dict[str, Any]) -> None:
            status.update(plan=asdict(plan), data=data, n_records=len(records),
                          case_ids=[str(r.get("case_id", i)) for i, r in enumerate(records[:plan.n_edits])])
            status.setdefault("runs", {})

        self.status = update_status(self.out, start)

    def _open(self, path: pathlib.Path, editor_name: str, n: int, batch_size: int, eval_every: int,
              retention_sample: int) -> EditSession:
        """A session on its own copy of the unedited model: resumed from ``path`` when a run is there."""
        model = copy.deepcopy(self.model)
        if (path / "config.json").exists():
            return EditSession.resume(path, model, self.tok, self.records[:n], cache=self.cache, corpus=self.corpus,
                                      progress=False)
        editor = get_editor(editor_name, self.plan.hparams.get(editor_name, {}))
        key = editor.context_lengths
        if key not in self.templates:
            self.templates[key] = generate_templates(self.model, self.tok, key, seed=self.plan.seed)
        mode = "sequential" if batch_size == 1 else ("batch" if batch_size >= n else "sequential-batch")
        return EditSession(model, self.tok, editor, out=path, corpus=self.corpus, stats_tokens=self.stats_tokens,
                           cache=self.cache, seed=self.plan.seed, eval_every=eval_every, eval_texts=self.texts,
                           generation_prompts=self.prompts, templates=self.templates[key], progress=False,
                           retention_sample=retention_sample,
                           config={"data": self.status.get("data"), "n_edits": n, "mode": mode,
                                   "batch_size": batch_size, "study": str(self.out)})

    def _record(self, name: str | None, path: pathlib.Path | None = None, before: int = 0) -> None:
        """Update study.json with the run's timing and this sitting's span of it (``before``: its edits when
        this sitting took it up); with no run, only the sitting's seconds."""
        entry = None
        if name is not None:
            run = load_run(path)
            entry = {"path": str(path.relative_to(self.out)), **run_timing(run)}
        if self.sitting is not None:
            self.sitting["seconds"] = round(time.perf_counter() - self._t0, 1)
            if name is not None:
                self.sitting["edits"].setdefault(name, [before, len(run.edits)])[1] = len(run.edits)

        def change(status: dict[str, Any]) -> None:
            if entry is not None:
                status.setdefault("runs", {})[name] = entry
            if self.sitting is not None:
                status["sittings"][self.sitting["index"]].update(self.sitting)

        self.status = update_status(self.out, change)

    def start_sitting(self, parts: tuple[str, ...]) -> None:
        """Log this sitting in study.json: its parts, torch threads and start, and then, each time a run has
        advanced (a checkpoint interval, a batch run), its seconds and each run's edits [from, to). A killed
        sitting keeps what it logged last: the edits after its last log belong to no sitting."""
        self._t0 = time.perf_counter()
        sitting: dict[str, Any] = {"parts": list(parts), "threads": torch.get_num_threads(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": 0.0, "edits": {}}

        def add(status: dict[str, Any]) -> None:
            sittings = status.setdefault("sittings", [])
            sitting["index"] = len(sittings)
            sittings.append(sitting)

        self.status = update_status(self.out, add)
        self.sitting = sitting

    def lock(self, part: str) -> AbstractContextManager:
        """The lock of one part of the study, taken (a context manager that releases it); taking it fails at
        once while another process runs that part."""
        lock = FileLock(str(self.out / f"study.{part}.lock"))
        try:
            return lock.acquire(timeout=0)
        except Timeout:
            raise CollapseDiagError(f"another process is running the {part} part of the study in {self.out} "
                                    f"(lock {lock.lock_file}); run the other part, or wait for it") from None

    def sequential(self) -> dict[str, Run]:
        """The sequential runs, advanced together one checkpoint interval at a time: the run furthest behind goes
        next, so a resumed study evens them out first."""
        plan, n = self.plan, self.plan.n_edits
        paths = {e: self.out / "seq" / e for e in plan.editors}
        sessions = {e: self._open(paths[e], e, n, 1, plan.eval_every, plan.retention_sample) for e in plan.editors}
        bar = progress_bar(total=n * len(sessions), desc="sequential study", unit="edit", disable=not self.progress)
        bar.update(sum(s.n_edits for s in sessions.values()))
        while any(s.n_edits < n for s in sessions.values()):
            e = min(sessions, key=lambda name: sessions[name].n_edits)  # the run furthest behind (ties: plan order)
            s = sessions[e]
            stop = interval_end(s.n_edits, plan.eval_every, n)
            bar.set_postfix(editor=e, edit=s.n_edits)
            before = s.n_edits
            s.run(self.records[s.n_edits:stop], batch_size=1, progress=False)
            bar.update(s.n_edits - before)
            self._record(f"seq/{e}", paths[e], before)
        bar.close()
        return {e: load_run(p) for e, p in paths.items()}

    def _fork_sequential(self, path: pathlib.Path, editor: str, batch_size: int, n: int) -> bool | None:
        """Batch size 1 of an editor that also has a sequential run is that run's first ``n`` edits (the same
        edits on the same records with the same settings): fork them instead of making them again.

        Returns True when it forked, False when the sequential run has not reached ``n`` edits yet, None when
        there is nothing to fork (another batch size or editor, or the batch run exists already)."""
        src = self.out / "seq" / editor
        if batch_size != 1 or editor not in self.plan.editors or (path / "config.json").exists():
            return None
        if not (src / "config.json").exists() or len(load_run(src).edits) < n:
            return False
        fork_run(src, path, n, {"n_edits": n, "mode": "sequential", "batch_size": 1, "retention_sample": 0},
                 last_checkpoint=False)  # the end score re-tests every edit
        return True

    def batches(self, wait_for_forks: bool = False) -> dict[str, Run]:
        """The batch study: each editor at each batch size over the same first ``batch_edits`` records.

        Its checkpoints re-test every edit (no retention sample), so the end scores of all batch sizes cover
        the same edits. Batch size 1 of an editor with a sequential run is forked from that run; with
        ``wait_for_forks`` (the sequential part runs elsewhere) a fork whose source is still short is left for
        a later call instead of being edited from scratch. Each run is locked while it is made: a run another
        process holds is skipped, so several processes can share the batch study."""
        plan = self.plan
        n = min(plan.batch_edits, len(self.records))
        runs = {}
        (self.out / "batch").mkdir(parents=True, exist_ok=True)
        for name, editor, b in plan.batch_runs():
            path = self.out / "batch" / name
            with ExitStack() as held:
                try:  # another process on this run: leave it to that one
                    held.enter_context(FileLock(str(self.out / "batch" / f"{name}.lock")).acquire(timeout=0))
                except Timeout:
                    continue
                run = self._batch_run(path, name, editor, b, n, wait_for_forks)
            if run is not None:
                runs[name] = run
        return runs

    def _batch_run(self, path: pathlib.Path, name: str, editor: str, b: int, n: int,
                   wait_for_forks: bool) -> Run | None:
        """One run of the batch study made or finished; None when it is a fork left for later."""
        plan = self.plan
        if self._fork_sequential(path, editor, b, n) is False and wait_for_forks:
            return None
        every = b if b > 1 else plan.eval_every  # scored after each batch (size 1: as the sequential runs)
        s = self._open(path, editor, n, b, every, 0)
        s.env.target_cache = self.targets
        before = s.n_edits
        bar = progress_bar(total=n, initial=before, desc=name, unit="edit", disable=not self.progress)
        while True:  # one checkpoint interval at a time, logged as it goes
            stop = interval_end(s.n_edits, every, n)
            # also when no edit is left (a fork, or a run cut before it): run() ends with the end-of-run checkpoint
            done = s.n_edits
            s.run(self.records[s.n_edits:stop], batch_size=b, progress=False)
            bar.update(s.n_edits - done)
            self._record(f"batch/{name}", path, before)
            if s.n_edits >= n:
                break
            if s.n_edits == done:
                raise CollapseDiagError(f"batch run {name} made no edit at edit {done} of {n}")
        bar.close()
        del s
        return load_run(path)


def run_long_study(model: nn.Module, tok: object, records: list[dict[str, Any]], out: str | os.PathLike,
                   plan: LongStudyPlan, batches: bool = True, parts: tuple[str, ...] = PARTS,
                   **kw: Any) -> dict[str, dict[str, Run]]:
    """Run (or resume) the long study; returns ``{"seq": {editor: Run}, "batch": {name: Run}}``.

    ``parts`` picks the sequential runs ("seq"), the batch study ("batch") or both, in that order; two processes
    may run one part each at once (with one thread each on a small machine). The sequential part runs in one
    process at a time; the batch part in any number, each run of it in one (a process skips the runs another
    holds, and returns the runs it made or found done). Run alone, the batch part waits for the sequential runs
    it forks from: those batch runs are made by a later call."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise CollapseDiagError(f"unknown study part(s) {sorted(unknown)}: choose from {list(PARTS)}")
    parts = tuple(p for p in PARTS if p in parts and (p != "batch" or (batches and plan.batch_editors)))
    if not parts:
        raise CollapseDiagError("nothing to run: the batch part alone, with no batch editors")
    study = LongStudy(model, tok, records, out, plan, **kw)
    result: dict[str, dict[str, Run]] = {"seq": {}, "batch": {}}
    with ExitStack() as locks:
        if "seq" in parts:  # first: a refused start makes nothing and logs no sitting
            locks.enter_context(study.lock("seq"))
        study.start_sitting(parts)
        try:
            for part in parts:
                result[part] = study.sequential() if part == "seq" else \
                    study.batches(wait_for_forks="seq" not in parts)
        finally:
            study._record(None)  # the sitting's seconds, also when it is stopped by an error or Ctrl-C
    return result

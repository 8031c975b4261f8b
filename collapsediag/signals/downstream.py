"""Downstream tasks: a JSON Lines data file plus a short JSON spec, scored few-shot at checkpoints.

A spec (the six built-in ones are ``collapsediag/data/tasks/<name>.json``; a user's own is the same format)::

    {"data": "sst2.jsonl",                          # the records; relative to the spec (built-in: the data dir)
     "template": "Review: {sentence}\\nSentiment:",  # str.format over a record's fields ({choices[0]} works)
     "label": "label",                               # the field holding each record's label
     "answers": {"0": " negative", "1": " positive"},  # label value (as text) -> the words that follow the prompt
     "shots": 4,                                     # demonstrations before every scored example (default 0)
     "metrics": ["accuracy"],                        # accuracy always; "f1" (needs "positive") and "mcc"
     "positive": "1",                                # the label value F1 counts as positive
     "preamble": "", "separator": "\\n\\n"}          # text before the demonstrations; text between examples

Every record is checked when the task is loaded (before any model loads): it must hold the label field, a
label among the answers, and every field the template names. The demonstrations and the scored subset are
drawn once with a seeded generator and fixed for the whole run: ``shots`` records as demonstrations (never
scored), then ``n`` others (``collapsediag.signals.downstream_score`` scores them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import TaskError

TASKS_DIR = pathlib.Path(__file__).parent.parent / "data" / "tasks"
DATA_ENV = "COLLAPSEDIAG_GLUE_EVAL"
DEFAULT_N = 200
METRICS = ("accuracy", "f1", "mcc")


@dataclass(frozen=True)
class TaskSpec:
    """How to turn a task's records into prompts and answers (see the module docstring)."""

    template: str
    answers: dict[str, str]
    data: str = ""
    label: str = "label"
    shots: int = 0
    metrics: tuple[str, ...] = ("accuracy",)
    positive: str | None = None
    preamble: str = ""
    separator: str = "\n\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], task: str) -> "TaskSpec":
        """Parse and check a spec; ``TaskError`` names the task and the faulty key."""
        if not isinstance(d, dict):
            raise TaskError(task, f"spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TaskError(task, f"unknown spec key(s) {unknown}; known: {sorted(known)}")
        for key in ("template", "answers"):
            if key not in d:
                raise TaskError(task, f"spec has no {key!r}")
        answers = d["answers"]
        if not isinstance(answers, dict) or len(answers) < 2:
            raise TaskError(task, "'answers' must map at least two label values to answer words")
        answers = {str(k): v for k, v in answers.items()}
        if not all(isinstance(v, str) and v.strip() for v in answers.values()):
            raise TaskError(task, "every answer word must be non-empty text")
        if len(set(answers.values())) != len(answers):
            raise TaskError(task, "two labels share one answer word")
        metrics = tuple(d.get("metrics", ("accuracy",)))
        if not set(metrics) <= set(METRICS):
            raise TaskError(task, f"unknown metric(s) {sorted(set(metrics) - set(METRICS))}; known: {list(METRICS)}")
        metrics = tuple(m for m in METRICS if m == "accuracy" or m in metrics)  # accuracy always, fixed order
        positive = None if d.get("positive") is None else str(d["positive"])
        if "f1" in metrics and positive not in answers:
            raise TaskError(task, f"metric f1 needs 'positive', one of the label values {list(answers)}")
        shots = d.get("shots", 0)
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise TaskError(task, f"'shots' must be an integer 0 or more, got {shots!r}")
        return cls(template=str(d["template"]), answers=answers, data=str(d.get("data", "")),
                   label=str(d.get("label", "label")), shots=shots, metrics=metrics, positive=positive,
                   preamble=str(d.get("preamble", "")), separator=str(d.get("separator", "\n\n")))

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON data (``from_dict`` reads it back)."""
        d = dataclasses.asdict(self)
        d["metrics"] = list(self.metrics)
        return d


@dataclass
class Task:
    """A loaded task: its spec, its records, and the fixed demonstrations and scored subset (record indices)."""

    name: str
    spec: TaskSpec
    path: pathlib.Path
    records: list[dict[str, Any]]
    demos: list[int] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """The label values in the spec's order (the answer index of each prediction)."""
        return list(self.spec.answers)

    def gold(self) -> np.ndarray:
        """The answer index of each scored record."""
        where = {v: i for i, v in enumerate(self.labels)}
        return np.array([where[str(self.records[i][self.spec.label])] for i in self.scored], dtype=int)

    def prompts(self) -> list[str]:
        """One prompt per scored record: preamble, the demonstrations with their answers, then the record."""
        s = self.spec
        shots = [render(s.template, self.records[i]) + s.answers[str(self.records[i][s.label])] for i in self.demos]
        head = s.preamble + "".join(x + s.separator for x in shots)
        return [head + render(s.template, self.records[i]) for i in self.scored]


def render(template: str, record: dict[str, Any]) -> str:
    """``template`` filled from ``record`` (text values stripped of surrounding whitespace)."""
    return template.format(**{k: v.strip() if isinstance(v, str) else v for k, v in record.items()})


def builtin_tasks() -> list[str]:
    """Names of the built-in tasks (the spec files under ``collapsediag/data/tasks``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.json"))


def data_dir(given: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Where the built-in tasks' data files are: ``given``, else ``$COLLAPSEDIAG_GLUE_EVAL``, else
    ``../shared/data/glue_eval`` from the working directory if it exists (None when none is found)."""
    for d in (given, os.environ.get(DATA_ENV)):
        if d:
            return pathlib.Path(d)
    shared = pathlib.Path("..") / "shared" / "data" / "glue_eval"
    return shared if shared.is_dir() else None


def parse_tasks(text: str) -> list[tuple[str, pathlib.Path | None]]:
    """``sst2,mmlu,mine=path/spec.json`` as (name, spec path or None for a built-in task)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name = name.strip()
        if sep and not path.strip():
            raise TaskError(name, "give the spec file after '=' (NAME=path/spec.json)")
        if not sep and name not in builtin_tasks():
            raise TaskError(name, f"no such built-in task; built-in: {', '.join(builtin_tasks())} "
                                  "(or NAME=path/spec.json for your own)")
        out.append((name, pathlib.Path(path.strip()) if sep else None))
    if len({n for n, _ in out}) != len(out):
        raise TaskError(",".join(n for n, _ in out), "a task name is given twice")
    if not out:
        raise TaskError(text, "no task given")
    return out


def read_records(path: pathlib.Path, task: str) -> list[dict[str, Any]]:
    """The JSON Lines records of a task's data file (blank lines skipped)."""
    if not path.is_file():
        raise TaskError(task, f"data file {path} not found")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines: U+2028 in text
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(task, f"not JSON ({exc.msg})", f"at line {n} of {path}") from None
        if not isinstance(rec, dict):
            raise TaskError(task, "not a JSON object", f"at line {n} of {path}")
        rec["_line"] = n
        out.append(rec)
    if not out:
        raise TaskError(task, f"data file {path} holds no records")
    return out


def record_name(rec: dict[str, Any], path: pathlib.Path) -> str:
    """How errors name a record: its line, and its id field where it has one."""
    ident = next((f" ({k} {rec[k]!r})" for k in ("idx", "index", "id") if k in rec), "")
    return f"at line {rec.get('_line')} of {path}{ident}"


def check_records(task: str, spec: TaskSpec, records: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Every record has the label field, a label among the answers, and every field the template names."""
    for rec in records:
        where = record_name(rec, path)
        if spec.label not in rec:
            fields = sorted(k for k in rec if k != "_line")
            raise TaskError(task, f"has no label field {spec.label!r} (fields: {fields})", where)
        if str(rec[spec.label]) not in spec.answers:
            raise TaskError(task, f"label {rec[spec.label]!r} is not among the answers {list(spec.answers)}", where)
        try:
            render(spec.template, rec)
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise TaskError(task, f"the template cannot be filled ({type(exc).__name__}: {exc})", where) from None


def draw(n_records: int, shots: int, n: int, seed: int, task: str) -> tuple[list[int], list[int]]:
    """The demonstrations and the scored records (indices): one seeded permutation, its first ``shots`` are the
    demonstrations, the next ``n`` (at most the rest) are scored. The same (seed, task, sizes) give the same."""
    if n < 1:
        raise TaskError(task, f"n must be at least 1, got {n}")
    if n_records <= shots:
        raise TaskError(task, f"{n_records} records leave none to score after {shots} demonstrations")
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    order = [int(i) for i in rng.permutation(n_records)]
    return order[:shots], order[shots:shots + n]


def load_task(name: str, spec_path: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
              n: int = DEFAULT_N, seed: int = 0) -> Task:
    """A task, checked and with its fixed subset: a built-in one by ``name`` (its data file under ``data``, see
    ``data_dir``), or a user's own from ``spec_path`` (its ``data`` relative to the spec's folder)."""
    if spec_path is None:
        if name not in builtin_tasks():
            raise TaskError(name, f"no such built-in task; built-in: {', '.join(builtin_tasks())}")
        spec_file, root = TASKS_DIR / f"{name}.json", data_dir(data)
        if root is None:
            raise TaskError(name, f"built-in task data not found: give --downstream-data DIR or set ${DATA_ENV}")
    else:
        spec_file = pathlib.Path(spec_path)
        root = spec_file.parent
    try:
        raw = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TaskError(name, f"cannot read spec {spec_file}: {exc}") from None
    spec = TaskSpec.from_dict(raw, name)
    if not spec.data:
        raise TaskError(name, f"spec {spec_file} names no 'data' file")
    return task_from_spec(name, spec, root / spec.data, n, seed)


def task_from_spec(name: str, spec: TaskSpec, path: str | os.PathLike, n: int = DEFAULT_N, seed: int = 0) -> Task:
    """A task from a parsed spec and its data file: records read and checked, subset drawn."""
    path = pathlib.Path(path).resolve()
    records = read_records(path, name)
    check_records(name, spec, records, path)
    demos, scored = draw(len(records), spec.shots, n, seed, name)
    return Task(name, spec, path, records, demos, scored)


def load_tasks(text: str, data: str | os.PathLike | None = None, n: int = DEFAULT_N, seed: int = 0) -> list[Task]:
    """Every task of a ``--downstream`` value (``parse_tasks``), loaded and checked."""
    return [load_task(name, spec, data, n, seed) for name, spec in parse_tasks(text)]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a run records its tasks' data files by it)."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()

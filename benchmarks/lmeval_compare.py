"""The built-in downstream scorer against lm-evaluation-harness on the same prompts (optional extra ``lmeval``).

lm-eval scores an in-memory model (``HFLM(pretrained=model, tokenizer=tok)``) offline on local JSON Lines
files through a task YAML of its own (``dataset_path: json``). Its few-shot sampler draws demonstrations per
example, ours once per run; so that both score the very same text, each task's prompts (our demonstrations
included) are written to a temporary JSON Lines file, and lm-eval scores them zero-shot as a multiple-choice
task whose choices are the answer words (``target_delimiter: ""``: our answer words carry their own space).
This compares the scoring (tokenisation, log-probabilities, argmax), not the prompt format.

Prints one JSON object: per task, n, our accuracy, lm-eval's acc, the examples on which the two predictions
disagree, and the largest difference between the two log-probabilities of one answer.

Run alone: pip install lm-eval; python benchmarks/lmeval_compare.py [--n 200] [--tasks sst2,mmlu]
Quick check: python benchmarks/lmeval_compare.py --quick   (n = 8, sst2 and mmlu)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collapsediag import load_model  # noqa: E402
from collapsediag.signals.downstream import Task, builtin_tasks, load_tasks  # noqa: E402
from collapsediag.signals.downstream_score import answer_logprobs  # noqa: E402

YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: {choices}
doc_to_target: gold
target_delimiter: ""
num_fewshot: 0
metric_list:
  - metric: acc
"""


def write_task(task: Task, folder: pathlib.Path) -> str:
    """Our prompts of ``task`` as a local JSON Lines file and an lm-eval task YAML beside it; the task's name."""
    name = f"cd_{task.name}"
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for prompt, gold in zip(task.prompts(), task.gold()):
            f.write(json.dumps({"prompt": prompt, "gold": int(gold)}) + "\n")
    choices = json.dumps(list(task.spec.answers.values()))
    (folder / f"{name}.yaml").write_text(YAML.format(task=name, data=data, choices=choices), encoding="utf-8")
    return name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(builtin_tasks()))
    ap.add_argument("--data", default=None, help="built-in tasks' data folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="n = 8 on sst2 and mmlu")
    args = ap.parse_args()
    if args.quick:
        args.n, args.tasks = 8, "sst2,mmlu"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = load_tasks(args.tasks, args.data, args.n)
    model, tok = load_model(args.model)
    out = {"model": args.model, "n": args.n, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        names = {write_task(t, pathlib.Path(tmp)): t for t in tasks}
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16)
        res = simple_evaluate(model=lm, tasks=list(names), task_manager=TaskManager(include_path=tmp),
                              log_samples=True, bootstrap_iters=0)
    for name, task in names.items():
        lp = answer_logprobs(model, tok, task)
        ours = lp.argmax(axis=1)
        their_lp = np.array([[float(r[0]) for r in s["filtered_resps"]]
                             for s in sorted(res["samples"][name], key=lambda s: s["doc_id"])])
        differ = [int(i) for i in np.flatnonzero(their_lp.argmax(axis=1) != ours)]
        out["tasks"][task.name] = {"n": len(ours), "ours": float((ours == task.gold()).mean()),
                                   "lm_eval": float(res["results"][name]["acc,none"]), "differ": differ,
                                   "max_logprob_diff": float(np.abs(their_lp - lp).max())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

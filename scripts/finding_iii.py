"""Finding (iii) at N = 1,024 on the embedded model: MEMIT and EMMET, arms A and B, B in {16, 64, 256, 1024},
two record orderings, on layers 3-7 and on the single layer a small sweep picks. Resumable: run it again.

  python scripts/finding_iii.py --out ~/collapsediag-runs/iii [--editors memit,emmet] [--n 1024]
  python scripts/finding_iii.py --out ~/collapsediag-runs/iii --report     # tables and verdicts, no editing

Writes <out>/iii.json (every run's scores and the verdict per editor and layer set) after each layer set.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

from collapsediag.data import load_data
from collapsediag.experiments.batchsize import Setup, arm_table, batch_arms, finding_iii, layer_sweep
from collapsediag.runs.store import load_run
from collapsediag.stats import StatsCache

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact_mend" / "counterfact-edit.json"


def report(out: pathlib.Path, n: int, sizes: tuple[int, ...] = (16, 64, 256, 1024)) -> dict:
    """Every finished or partial layer set under ``out``: its arm table and the verdict (``partial`` while a
    batch size of ``sizes`` has no finished run)."""
    result = {"n": n, "sets": {}}
    for d in sorted(p for p in out.glob("*-L*") if p.is_dir()):
        runs = {f"{o.name}/{r.name}": load_run(r) for o in sorted(d.glob("order*")) for r in sorted(o.iterdir())
                if (r / "config.json").exists()}
        runs = {k: r for k, r in runs.items() if len(r.edits) == n}
        if not runs:
            continue
        table = arm_table(runs)
        result["sets"][d.name] = {"runs": table.round(4).to_dict("records"), "verdict": finding_iii(table, n, sizes)}
    if (out / "sweep.json").exists():
        result["layer_sweep"] = json.loads((out / "sweep.json").read_text())
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--editors", default="memit,emmet")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="16,64,256,1024")
    ap.add_argument("--orderings", default="0,1")
    ap.add_argument("--sweep-layers", default="3,4,5,6,7")
    ap.add_argument("--sweep-n", type=int, default=32)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    out = pathlib.Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.report:
        print(json.dumps(report(out, args.n, sizes), indent=1))
        return
    from collapsediag.models import load_model

    records = load_data(f"counterfact:{args.data}", args.n)
    model, tok = load_model("smollm2-135m")
    cache = StatsCache()
    orders = tuple(int(k) for k in args.orderings.split(","))
    for editor in args.editors.split(","):
        sets = [[3, 4, 5, 6, 7]]
        sweep_file = out / "sweep.json"
        sweeps = json.loads(sweep_file.read_text()) if sweep_file.exists() else {}
        if editor not in sweeps:
            t0 = time.perf_counter()
            table, best = layer_sweep(model, tok, records, out / "sweep" / editor, Setup(editor, [5], cache=cache),
                                      [int(x) for x in args.sweep_layers.split(",")], args.sweep_n)
            sweeps[editor] = {"best": best, "table": table.round(4).to_dict("records"),
                              "seconds": round(time.perf_counter() - t0, 1)}
            sweep_file.write_text(json.dumps(sweeps, indent=1))
        sets.append([sweeps[editor]["best"]])
        for layers in sets:
            name = f"{editor}-L{''.join(map(str, layers))}"
            t0 = time.perf_counter()
            batch_arms(model, tok, records, out / name, Setup(editor, layers, cache=cache), n=args.n,
                       batch_sizes=sizes, orderings=orders, log=lambda m: print(time.strftime("%H:%M:%S"), m,
                                                                                flush=True))
            print(f"{name} done in {time.perf_counter() - t0:.0f} s", flush=True)
            (out / "iii.json").write_text(json.dumps(report(out, args.n, sizes), indent=1))


if __name__ == "__main__":
    main()

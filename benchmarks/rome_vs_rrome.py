"""Sequential ROME vs r-ROME on the embedded model: denominators, efficacy, seconds per edit.

Run: python benchmarks/rome_vs_rrome.py --data counterfact:../shared/data/counterfact.json --n-edits 20
(or --reuse DIR to summarise runs already written to DIR/rome and DIR/r-rome). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from collapsediag.cli import main as cli
from collapsediag.runs.store import load_run


def summarise(path: pathlib.Path) -> dict:
    """The figures the closing note quotes, from one saved run."""
    run = load_run(path)
    den = run.layers["denominator"]
    e = run.edits
    w0 = run.config["initial_weights"][str(run.config["layers"][0])]["weight_l1"]
    return {"edits": len(e), "ok": int((e["status"] == "ok").sum()),
            "efficacy": float(e["efficacy"].astype(float).mean()),
            "denominator_min": float(den.min()), "denominator_median": float(den.median()),
            "denominator_max": float(den.max()), "delta_fro_max": float(run.layers["delta_fro"].max()),
            "weight_l1_growth_pct": float(100 * (run.layers["weight_l1"].iloc[-1] / w0 - 1)),
            "seconds_per_edit_mean": float(e["seconds"].mean()),
            "seconds_per_edit_median": float(e["seconds"].median())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="counterfact:../shared/data/counterfact.json")
    ap.add_argument("--n-edits", type=int, default=20)
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--reuse", default=None, help="directory holding rome/ and r-rome/ runs")
    args = ap.parse_args()
    root = pathlib.Path(args.reuse or tempfile.mkdtemp(prefix="cd-bench-"))
    if not args.reuse:
        for editor in ("rome", "r-rome"):
            cli(["run", "--model", "smollm2-135m", "--editor", editor, "--data", args.data,
                 "--n-edits", str(args.n_edits), "--layers", str(args.layer), "--out", str(root / editor)])
    print(json.dumps({e: summarise(root / e) for e in ("rome", "r-rome")}, indent=1))


if __name__ == "__main__":
    main()

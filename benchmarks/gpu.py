"""Sequential ROME, r-ROME and MEMIT edits on randomly initialised models of GPT-2 XL and Llama-3-8B shape.

Random weights cost the same time as trained ones, so no weights need to be brought to the machine: the models
are built from configs on the device, the tokenizer is collapsediag.testing's (built locally; the model's vocabulary is
larger, its extra rows are never used). Every edit runs a fixed number of target steps (no early stop: the loss
of a random model never gets near the 0.05 threshold, and MPES is off). Prints one JSON line per
(model, dtype, editor): edits per second and the peak GPU memory.

    python benchmarks/gpu.py                        # on a GPU: gpt2-xl and llama3-8b shapes, fp32 and bf16
    python benchmarks/gpu.py --small --device cpu   # CPU smoke run on small configs of the same families
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collapsediag import EditSession, arch_for, get_editor  # noqa: E402
from collapsediag.stats import StatsCache, TextCorpus  # noqa: E402
from collapsediag.testing import build_tokenizer, corpus_texts  # noqa: E402

RECORDS = [{"case_id": str(i), "subject": s, "prompt": p, "target_new": n, "target_true": t}
           for i, (s, p, n, t) in enumerate([
               ("Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
               ("Angola", "{} is located in", "Italy", "Africa"),
               ("Tokyo", "{} is a citizen of", "Spain", "Japan"),
               ("Kiki Dee", "The official religion of {} is", "Islam", "Christianity"),
               ("the Nile", "{} flows through", "Japan", "Egypt")])]


def config(shape: str, small: bool):
    """A transformers config of GPT-2 XL or Llama-3-8B shape (``small``: 4 layers, width 256)."""
    from transformers import GPT2Config, LlamaConfig

    if shape == "gpt2-xl":
        kw = dict(n_embd=256, n_layer=4, n_head=4) if small else dict(n_embd=1600, n_layer=48, n_head=25)
        return GPT2Config(vocab_size=50257, n_positions=1024, **kw)
    kw = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=896) if small else dict(hidden_size=4096, num_hidden_layers=32,
                                                        num_attention_heads=32, num_key_value_heads=8,
                                                        intermediate_size=14336)
    return LlamaConfig(vocab_size=128256, max_position_embeddings=2048, **kw)


LAYERS = {"gpt2-xl": ([17], [13, 14, 15, 16, 17]), "llama3-8b": ([5], [4, 5, 6, 7, 8])}


def batch_targets(model, tok, layers: list[int], args: argparse.Namespace, cuda: bool, shape: str,
                  dtype: str) -> None:
    """One MEMIT update of ``args.batch`` edits from the same weights, its targets optimised one request at a
    time and then together (``batch_target``): prints edits per second of each and their ratio."""
    records = [dict(r, case_id=f"{r['case_id']}-{i}") for i in range(args.batch // len(RECORDS) + 1)
               for r in RECORDS][:args.batch]
    seconds = {}
    for batched in (False, True):
        editor = get_editor("memit", {"layers": layers, "z_num_grad_steps": args.steps, "batch_target": batched})
        stats = StatsCache(pathlib.Path("runs/gpu_stats")).get(
            model, tok, arch_for(model), editor.layers(), TextCorpus.from_texts(corpus_texts(200)),
            n_tokens=4096, seq_len=128, progress=False)
        s = EditSession(model, tok, editor, stats=stats, templates=["{}", "The city of music. {}"], progress=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        s.run(records, batch_size=len(records), progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds[batched] = time.perf_counter() - t0
        s.restore()
        print(json.dumps({"shape": shape + ("-small" if args.small else ""), "dtype": dtype, "editor": "memit",
                          "batch": len(records), "batch_target": batched,
                          "edits_per_second": round(len(records) / seconds[batched], 4),
                          "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda
                          else None}), flush=True)
    print(json.dumps({"shape": shape, "dtype": dtype, "batch": len(records),
                      "batched_speedup": round(seconds[False] / seconds[True], 3)}), flush=True)


def main() -> None:
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="4-layer width-256 configs (smoke run)")
    ap.add_argument("--shapes", nargs="+", default=["gpt2-xl", "llama3-8b"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="MEMIT batch for one-at-a-time vs batched targets (0: off)")
    args = ap.parse_args()
    tok = build_tokenizer()
    cuda = args.device.startswith("cuda")
    for shape in args.shapes:
        for dtype in args.dtypes:
            torch.manual_seed(0)
            with torch.device(args.device):
                model = AutoModelForCausalLM.from_config(config(shape, args.small), dtype=getattr(torch, dtype))
            model.eval().requires_grad_(False)
            one, many = LAYERS[shape]
            if args.small:
                one, many = [1], [1, 2]
            for name, hp in (("rome", {"layer": one[0], "v_num_grad_steps": args.steps}),
                             ("r-rome", {"layer": one[0], "v_num_grad_steps": args.steps}),
                             ("memit", {"layers": many, "z_num_grad_steps": args.steps})):
                editor = get_editor(name, hp)
                stats = StatsCache(pathlib.Path("runs/gpu_stats")).get(
                    model, tok, arch_for(model), editor.layers(),
                    TextCorpus.from_texts(corpus_texts(200)), n_tokens=4096, seq_len=128, progress=False)
                s = EditSession(model, tok, editor, stats=stats, templates=["{}", "The city of music. {}"],
                                progress=False, diagnostics=True)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                s.edit(RECORDS[0])  # warm-up (kernels, caches)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                rows = s.run(RECORDS[1:1 + args.edits], progress=False)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                s.restore()
                print(json.dumps({
                    "shape": shape + ("-small" if args.small else ""), "dtype": dtype, "editor": name,
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "edits": len(rows),
                    "ok": sum(r["status"] == "ok" for r in rows), "steps": args.steps,
                    "edits_per_second": round(len(rows) / seconds, 4),
                    "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}),
                    flush=True)
            if args.batch:
                batch_targets(model, tok, many, args, cuda, shape, dtype)
            del model
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""EasyEdit hyper-parameter files (``hparams/<METHOD>/<model>.yaml``) read into collapsediag's editors.

Keys that set the algorithm map onto the editor's fields; keys that describe the environment (device, model
name, module-name templates, statistics source) are checked against the loaded model or noted; a key that would
change the algorithm and has no counterpart here is an error, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import CollapseDiagError

ALG_NAMES = {"rome": "rome", "r-rome": "r-rome", "r_rome": "r-rome", "rrome": "r-rome", "memit": "memit",
             "emmet": "emmet", "alphaedit": "alphaedit", "encore": "encore"}
# EasyEdit key -> collapsediag field, per editor family (ROME-style names v_*, batched z_*)
ROME_KEYS = {"v_num_grad_steps": "v_num_grad_steps", "v_lr": "v_lr", "v_weight_decay": "v_weight_decay",
             "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor", "mom2_adjustment": "mom2_adjustment"}
BATCH_KEYS = {"v_num_grad_steps": "z_num_grad_steps", "v_lr": "z_lr", "v_weight_decay": "z_weight_decay",
              "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor",
              "mom2_update_weight": "mom2_update_weight", "emmet_lambda": "emmet_lambda",
              "update_norm_lambda": "update_norm_lambda", "nullspace_threshold": "nullspace_threshold", "L2": "l2",
              "prob_cutoff": "mpes"}
# describe where and how the reference runs, not what it computes
ENVIRONMENT = {"alg_name", "model_name", "model_class", "tokenizer_class", "tokenizer_name", "device", "model_parallel",
               "fp16", "bf16", "max_length", "batch_size", "stats_dir", "mom2_dataset", "mom2_n_samples", "mom2_dtype",
               "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module",
               "v_loss_layer", "sequential_edit", "archive", "cache_dir"}
# algorithm keys whose only value here is the one collapsediag implements
FIXED = {"fact_token": {"subject_last"}, "layer_selection": {"all"}}


@dataclass
class HParamsFile:
    """What an EasyEdit file says: the editor, its hyper-parameters, context lengths, and the notes taken."""

    editor: str
    hparams: dict[str, Any]
    context_lengths: tuple[tuple[int, int], ...] | None = None
    notes: list[str] = field(default_factory=list)
    path: str = ""


def read_hparams_file(path: str | pathlib.Path, editor: str | None = None) -> HParamsFile:
    """Parse an EasyEdit YAML file; ``editor`` (e.g. ``--editor``) must agree with its ``alg_name`` if both exist."""
    import yaml

    p = pathlib.Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CollapseDiagError(f"cannot read hparams file {p}: {exc}") from None
    if not isinstance(raw, dict):
        raise CollapseDiagError(f"{p} is not a mapping of hyper-parameters")
    alg = str(raw.get("alg_name", "")).strip().lower()
    from_file = ALG_NAMES.get(alg)
    if alg and from_file is None:
        raise CollapseDiagError(f"{p}: alg_name {raw['alg_name']!r} is not an editor collapsediag has "
                                f"({', '.join(sorted(set(ALG_NAMES.values())))})")
    if editor and from_file and editor != from_file:
        raise CollapseDiagError(f"--editor {editor} contradicts {p}'s alg_name {raw['alg_name']!r}")
    name = editor or from_file
    if name is None:
        raise CollapseDiagError(f"{p} has no alg_name: give --editor")
    from . import EDITORS

    fields = {f.name for f in dataclasses.fields(EDITORS[name].HParams)}
    keys = ROME_KEYS if name in ("rome", "r-rome") else BATCH_KEYS
    out: dict[str, Any] = {}
    notes: list[str] = []
    lengths = None
    for key, value in raw.items():
        if key == "layers":
            layers = [int(x) for x in value]
            if "layers" in fields:
                out["layers"] = layers
            elif len(layers) != 1:
                raise CollapseDiagError(f"{p}: {name} edits one layer, the file gives layers {layers}")
            else:
                out["layer"] = layers[0]
        elif key in keys and keys[key] in fields:
            out[keys[key]] = -abs(int(value)) if key == "prob_cutoff" else _number(value)
        elif key == "context_template_length_params":
            lengths = tuple((int(a), int(b)) for a, b in value)
        elif key == "mom2_adjustment" and "mom2_adjustment" not in fields:
            if value is not True:  # the batched editors always weigh the update by C
                raise CollapseDiagError(f"{p}: mom2_adjustment: {value!r}: {name} always uses the key statistics C")
        elif key in FIXED:
            if str(value) not in FIXED[key]:
                raise CollapseDiagError(f"{p}: {key}: {value!r} is not implemented here (only "
                                        f"{sorted(FIXED[key])})")
        elif key == "rewrite_module_tmp" or key in ENVIRONMENT:
            notes.append(f"{key}: {value!r}")
        elif key == "mom2_update_weight" and name in ("rome", "r-rome", "alphaedit"):
            notes.append(f"{key}: {value!r} (not used by {name}'s update)")
        else:
            raise CollapseDiagError(f"{p}: key {key!r} would change {name} and has no counterpart in collapsediag")
    return HParamsFile(editor=name, hparams=out, context_lengths=lengths, notes=notes, path=str(p))


def _number(value: Any) -> Any:
    """YAML reads ``5e-1`` (no dot) as a string: numbers written that way become floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_environment(spec: HParamsFile, model: Any, arch: Any, n_layers: int) -> list[str]:
    """Check the file's module templates and loss layer against the loaded model; returns the notes to log.

    A ``rewrite_module_tmp`` that names another module than the one collapsediag edits is an error."""
    raw = dict(n.split(": ", 1) for n in spec.notes)
    layers = spec.hparams.get("layers") or [spec.hparams.get("layer")]
    if "rewrite_module_tmp" in raw:
        tmpl = raw["rewrite_module_tmp"].strip("'\"")
        for layer in layers:
            if layer is not None and tmpl.format(layer) != arch.rewrite_name(layer):
                raise CollapseDiagError(f"{spec.path}: rewrite_module_tmp {tmpl!r} names {tmpl.format(layer)!r}, "
                                        f"but this model's edited module is {arch.rewrite_name(layer)!r}")
    notes = [f"{spec.path}: {n}" for n in spec.notes]
    if "v_loss_layer" in raw and int(raw["v_loss_layer"]) != n_layers - 1:
        notes.append(f"{spec.path}: v_loss_layer {raw['v_loss_layer']} is not this model's last layer "
                     f"({n_layers - 1}); the loss is read at the output, as the reference does for its own model")
    return notes

"""Key statistics and projectors as the field publishes them (ALGORITHMS.md §16), loaded instead of recomputed.

kmeng01/rome and kmeng01/memit (and EasyEdit, which copied them) write one npz per layer:

    {stats_dir}/{model}/{dataset}_stats/{module}_{dtype}_{stats}[_t{batch_tokens}]_{n_samples}.npz

with ``mom2.mom2`` = Σ k kᵀ (unnormalised), ``mom2.count`` = number of token vectors, ``mom2.constructor`` and
``sample_size``; C = mom2 / count. AlphaEdit saves its projectors as ``null_space_project.pt``: a tensor
[n_layers, d, d], one P = Û Ûᵀ per edited layer in hparams order.
"""
from __future__ import annotations

import logging
import os
import pathlib
import re
import time
import warnings

import numpy as np
import torch

from ..arch import ArchSpec
from ..errors import CollapseDiagError
from ..stats import LayerStats

log = logging.getLogger(__name__)


def _pattern(module: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(module)}_(?P<dtype>[a-z0-9]+)_(?P<stats>[a-z0-9-]*mom2[a-z0-9-]*)"
                      rf"(?:_t(?P<tokens>\d+))?_(?P<n>\d+)\.npz$")


def find_stats_file(stats_dir: str | os.PathLike, module: str) -> pathlib.Path:
    """The statistics file of ``module`` under ``stats_dir`` (the root of model folders, or the folder of npz
    files itself); with several sample sizes or dtypes, the largest sample (float32 first on a tie)."""
    root = pathlib.Path(stats_dir).expanduser()
    if not root.is_dir():
        raise CollapseDiagError(f"--stats-dir {root} is not a folder")
    pat = _pattern(module)
    found = [(p, pat.match(p.name)) for p in root.rglob(f"{module}_*.npz")]
    found = [(p, m) for p, m in found if m]
    if not found:
        near = sorted({p.name for p in root.rglob("*.npz")})[:5]
        raise CollapseDiagError(f"no key-statistics file for {module} under {root} (looked for "
                                f"'{module}_<dtype>_mom2[_t<tokens>]_<n>.npz'; npz files there: {near or 'none'})")
    found.sort(key=lambda pm: (int(pm[1]["n"]), pm[1]["dtype"] == "float32"), reverse=True)
    return found[0][0]


def _model_folder(path: pathlib.Path, root: pathlib.Path) -> str | None:
    """The model folder a statistics file sits in (``{model}/{dataset}_stats/file``), if it is under root."""
    parent = path.parent
    if parent.name.endswith("_stats") and parent.parent != parent and root in (parent.parent, *parent.parent.parents):
        return parent.parent.name
    return None


def _names_match(folder: str, model: str) -> bool:
    variants = {model, model.replace("/", "_"), model.rstrip("/").split("/")[-1]}
    return folder in variants or folder.lower() in {v.lower() for v in variants}


def load_stats_file(path: str | os.PathLike, layer: int, d_in: int) -> LayerStats:
    """C = mom2 / count from one published npz, checked against the edited module's input size ``d_in``."""
    p = pathlib.Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "mom2.mom2" not in z.files or "mom2.count" not in z.files:
                raise CollapseDiagError(f"{p} holds {sorted(z.files)}, not a rome/memit statistics file "
                                        f"('mom2.mom2' and 'mom2.count')")
            mom2 = z["mom2.mom2"]
            count = int(np.asarray(z["mom2.count"]).reshape(-1)[0])
            sample = int(np.asarray(z["sample_size"]).reshape(-1)[0]) if "sample_size" in z.files else None
    except (OSError, ValueError) as exc:
        raise CollapseDiagError(f"cannot read statistics file {p}: {exc}") from None
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise CollapseDiagError(f"{p}: mom2.mom2 has shape {mom2.shape}, not a square matrix")
    if mom2.shape[0] != d_in:
        raise CollapseDiagError(f"{p} holds {mom2.shape[0]}-dimensional keys but layer {layer}'s edited module "
                                f"takes {d_in}: statistics of another model")
    if count <= 0 or not np.isfinite(mom2).all():
        raise CollapseDiagError(f"{p}: count {count} or non-finite values: not usable statistics")
    c = torch.from_numpy(mom2.astype(np.float64) / count)
    ident = {"source": "published", "file": str(p.resolve()), "layer": layer, "token_count": count,
             "sample_size": sample, "file_dtype": str(mom2.dtype), "dtype": "float64"}
    return LayerStats(layer, c, count, ident)


def stats_for_module(path: str | os.PathLike, model: torch.nn.Module, arch: ArchSpec, layer: int) -> LayerStats:
    """One published file as the statistics of ``layer``'s edited module: its size checked, on its device."""
    from ..arch import get_module, weight_matrix

    weight = weight_matrix(get_module(model, arch.rewrite_name(layer)))
    stats = load_stats_file(path, layer, weight.shape[1])
    stats.mom2 = stats.mom2.to(weight.device)
    return stats


def published_stats(stats_dir: str | os.PathLike, model: torch.nn.Module, arch: ArchSpec, layers: list[int],
                    model_name: str | None = None) -> dict[int, LayerStats]:
    """Published statistics of every layer in ``layers`` for ``model``; warns when the file sits in a folder
    named after another model, and fails when its dimension does not fit."""
    root = pathlib.Path(stats_dir).expanduser()
    out = {}
    t0 = time.perf_counter()
    for layer in layers:
        module = arch.rewrite_name(layer)
        path = find_stats_file(root, module)
        folder = _model_folder(path, root)
        if folder is not None and model_name and not _names_match(folder, model_name):
            warnings.warn(f"statistics file {path} is in a folder named for model {folder!r}, but the loaded "
                          f"model is {model_name!r}", stacklevel=2)
        out[layer] = stats_for_module(path, model, arch, layer)
    log.info("loaded published statistics of layers %s in %.2f s", layers, time.perf_counter() - t0)
    return out


def load_projector_file(path: str | os.PathLike, layers: list[int], d_in: int) -> dict[int, torch.Tensor]:
    """AlphaEdit's ``null_space_project.pt`` as an orthonormal basis U per layer (P = U Uᵀ), layers in the
    order the file stores them (the hparams' order)."""
    p = pathlib.Path(path)
    try:
        proj = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CollapseDiagError(f"cannot read projector file {p}: {exc}") from None
    if not isinstance(proj, torch.Tensor) or proj.dim() != 3 or proj.shape[1] != proj.shape[2]:
        raise CollapseDiagError(f"{p}: expected a tensor [n_layers, d, d], got "
                                f"{getattr(proj, 'shape', type(proj).__name__)}")
    if proj.shape[0] != len(layers):
        raise CollapseDiagError(f"{p} holds {proj.shape[0]} projectors, the editor edits {len(layers)} layers")
    if proj.shape[1] != d_in:
        raise CollapseDiagError(f"{p} holds {proj.shape[1]}-dimensional projectors, the edited module takes {d_in}")
    out = {}
    for i, layer in enumerate(layers):
        values, vectors = torch.linalg.eigh(proj[i].double())
        out[layer] = vectors[:, values > 0.5]  # P is a projector: eigenvalues 0 or 1
    return out

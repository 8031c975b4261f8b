"""Pre-edit risk scan: every record's ROME / r-ROME denominators and key geometry, from keys alone.

>>> df = scan(model, tok, records, layer=5)           # no update computed, no v* optimised
>>> df.head()                                         # sorted by risk_rank (1 = most at risk)
>>> write_scan(df, "scan.parquet"); read_scan("scan.parquet").attrs["context_templates"]

Only keys are needed (ALGORITHMS.md §2.3, §3.1): with u = C⁻¹k̄ / ‖C⁻¹k̄‖, ROME divides by k_uᵀu and
r-ROME by k̄ᵀu. Each (record, context template) sequence is cut after the subject's last token (a causal
model's key there does not see later tokens), sequences are batched across records, right-padded, and
every forward stops at the edited module. Sequences of one template share their context prefix: its
attention cache is computed once and reused (checked against a full forward once per template).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..arch import ArchSpec, arch_for
from ..editors import get_editor
from ..editors.context import generate_templates
from ..editors.rome import Rome
from ..errors import CollapseDiagError
from ..forward import cache_kwargs
from ..hooks import Trace
from ..models import model_fingerprint, model_name
from ..progress import progress_bar
from ..requests import EditRequest
from ..stats import LayerStats, StatsCache, TextCorpus
from ..tokens import encode, first_content_index, pad_batch, subject_span

log = logging.getLogger("collapsediag")

SIGNALS = ("denominator", "denominator_consistent", "denominator_ratio", "key_cosine", "key_norm_unprefixed",
           "key_norm_mean", "key_norm_prefixed", "key_mahalanobis_unprefixed", "key_mahalanobis_prefixed")
TEXT_COLUMNS = ("case_id", "status", "subject", "prompt", "target_new", "subject_last_piece")
DTYPES: dict[str, str] = {"risk_rank": "int64", "record_index": "int64", **{c: "string" for c in TEXT_COLUMNS},
                          "subject_first_token": "boolean", "subject_last_position": "Int64",
                          **{s: "float64" for s in SIGNALS}}
COLUMNS = ("risk_rank", "record_index", "case_id", "status", "subject", "prompt", "target_new",
           "subject_first_token", "subject_last_position", "subject_last_piece") + SIGNALS
PARQUET_KEY = b"collapsediag.scan"
_RECORD_ERRORS = (CollapseDiagError, ValueError, TypeError, KeyError, IndexError, AttributeError)


def scan(model: nn.Module, tok: object, records: Iterable[Mapping[str, Any] | EditRequest], layer: int, *,
         editor: str | Rome = "rome", stats: dict[int, LayerStats] | LayerStats | None = None,
         corpus: TextCorpus | None = None, stats_tokens: int = 100_000, cache: StatsCache | None = None,
         templates: list[str] | None = None, seed: int = 0, batch_size: int = 128, share_prefix: bool = True,
         arch: ArchSpec | None = None, progress: bool = True) -> pd.DataFrame:
    """Risk table of ``records`` for a ROME / r-ROME edit at ``layer``, computed before any edit.

    Parameters
    ----------
    model, tok : the unedited causal LM and its tokenizer (right padding, as ``prepare_tokenizer`` sets).
    records : flat fact dicts (``EditRequest.from_dict``) or ``EditRequest`` objects.
    layer : the edited layer; keys are read at its rewrite module.
    editor : ``"rome"``, ``"r-rome"`` or such an editor instance (its context lengths and
        ``mom2_adjustment`` are used).
    stats : key statistics, a ``{layer: LayerStats}`` dict (as ``EditSession`` takes) or one ``LayerStats``;
        computed from ``corpus`` (default: the packaged one) through ``cache`` when None. A dict without
        ``layer`` (or ``mom2_adjustment=False``) means no statistics: C⁻¹ is the identity, as in ``rome.py``.
    templates : context templates; generated from the model with ``seed`` when None, exactly as
        ``EditSession`` does, so the values equal those a ROME / r-ROME session records.
    batch_size : sequences (record × template) per forward.
    share_prefix : run each template's context prefix once and reuse its attention cache for every record
        (the same keys up to float rounding, far fewer tokens).

    Returns
    -------
    One row per record, sorted by ``risk_rank``. Signals (columns as in a run's ``layers`` table):
    ``denominator`` is the chosen editor's update denominator (ROME: k_uᵀu; r-ROME: k̄ᵀu, as its layers
    table records it), ``denominator_consistent`` k̄ᵀu, ``denominator_ratio`` k_uᵀu / k̄ᵀu, ``key_cosine``
    cos(k_u, k̄), ``key_norm_unprefixed`` ‖k_u‖, ``key_norm_mean`` ‖k̄‖, ``key_norm_prefixed`` ‖mean of
    the prefixed keys‖, ``key_mahalanobis_*`` √(kᵀC⁻¹k). Also ``subject_first_token`` (the subject starts
    the prompt's first non-special token), ``subject_last_position`` (its last token's index in the
    unprefixed prompt), ``subject_last_piece``, ``record_index`` (position in ``records``), ``case_id``,
    ``subject``, ``prompt``, ``target_new`` and ``status`` (``"ok"`` or why the record was skipped).

    Risk rule: ``risk_rank`` 1 is the record whose update denominator is smallest in absolute value at this
    layer (ROME's ‖ΔW‖ ≈ ‖δ‖ / |k_uᵀu|); ties keep the input order; rows with a NaN denominator and
    malformed records (status not ``"ok"``, NaN signals) come last.

    ``df.attrs``: model, model_fingerprint, layer, module, editor, seed, context_templates, stats (the
    statistics' identity, None without statistics), mom2_adjustment, collapsediag_version.
    """
    if getattr(tok, "padding_side", "right") != "right":
        raise CollapseDiagError(f"scan needs right padding (tokenizer has {tok.padding_side!r}): "
                                "call collapsediag.models.prepare_tokenizer(tok)")
    if batch_size < 1:
        raise CollapseDiagError(f"batch_size must be at least 1, got {batch_size}")
    ed = get_editor(editor, {"layer": layer}) if isinstance(editor, str) else editor
    if not isinstance(ed, Rome):
        raise CollapseDiagError(f"scan reads ROME-family denominators; editor {getattr(ed, 'name', ed)!r} "
                                "is not rome or r-rome")
    arch = arch or arch_for(model)
    module = arch.rewrite_name(layer)
    layer_stats = _layer_stats(model, tok, arch, layer, stats, ed.hparams.mom2_adjustment, corpus,
                               stats_tokens, cache, progress)
    if templates is None:
        templates = generate_templates(model, tok, ed.context_lengths, seed=seed)
    records = list(records)
    rows, seqs = _parse(tok, records, templates)
    good = [r for r, row in enumerate(rows) if row["status"] == "ok"]
    if good:
        k_u, k_bar, k_pre = _subject_keys(model, tok, module, [seqs[r] for r in good], batch_size,
                                          share_prefix, progress, f"scan L{layer}")
        values = _signals(k_u, k_bar, k_pre, layer_stats, ed.consistent_keys)
        for i, r in enumerate(good):
            rows[r].update({name: float(v[i]) for name, v in values.items()})
    df = _frame(rows)
    df.attrs = {"model": model_name(model), "model_fingerprint": model_fingerprint(model), "layer": int(layer),
                "module": module, "editor": ed.name, "seed": int(seed), "context_templates": list(templates),
                "stats": json.loads(json.dumps(layer_stats.identity, default=str)) if layer_stats else None,
                "mom2_adjustment": bool(ed.hparams.mom2_adjustment), "collapsediag_version": __version__}
    return df


def _layer_stats(model: nn.Module, tok: object, arch: ArchSpec, layer: int,
                 stats: dict[int, LayerStats] | LayerStats | None, mom2: bool, corpus: TextCorpus | None,
                 stats_tokens: int, cache: StatsCache | None, progress: bool) -> LayerStats | None:
    """The layer's statistics as the editor would use them (None: C⁻¹ is the identity)."""
    if not mom2:
        return None
    if isinstance(stats, LayerStats):
        return stats
    if stats is None:
        stats = (cache or StatsCache()).get(model, tok, arch, [layer], corpus or TextCorpus.packaged(),
                                            stats_tokens, progress=progress)
    return stats.get(layer)


def _parse(tok: object, records: list[Any], templates: list[str]
           ) -> tuple[list[dict[str, Any]], list[list[list[int]]]]:
    """One row per record and, for good records, its token ids under every template, cut after the subject."""
    rows: list[dict[str, Any]] = []
    seqs: list[list[list[int]]] = []
    for i, record in enumerate(records):
        row: dict[str, Any] = {"record_index": i, "status": "ok"}
        ids: list[list[int]] = []
        try:
            req = record if isinstance(record, EditRequest) else EditRequest.from_dict(record, case_id=i)
            row.update(case_id=str(req.case_id), subject=req.subject, prompt=req.prompt, target_new=req.target_new)
            span = subject_span(tok, req.prompt, req.subject, req.case_id)
            row.update(subject_first_token=span.first == first_content_index(tok, req.text),
                       subject_last_position=span.last, subject_last_piece=span.last_piece)
            for t in templates:  # as keys_at_subject tokenises: the whole text, the subject's last index
                p = t.format(req.prompt)
                last = span.last if p == req.prompt else subject_span(tok, p, req.subject, req.case_id).last
                ids.append(encode(tok, p.format(req.subject))[: last + 1])
        except _RECORD_ERRORS as exc:
            _skip(row, record, exc)
            ids = []
        rows.append(row)
        seqs.append(ids)
    return rows, seqs


def _skip(row: dict[str, Any], record: Any, exc: Exception) -> None:
    """Mark a malformed record's row and warn, naming the record."""
    row["status"] = f"{type(exc).__name__}: {exc}"
    if "case_id" not in row:
        cid = getattr(exc, "record_id", None)
        if cid is None:
            cid = record.get("case_id", row["record_index"]) if isinstance(record, Mapping) else row["record_index"]
        row["case_id"] = str(cid)
        if isinstance(record, Mapping):
            for key in ("subject", "prompt", "target_new"):
                value = record.get(key)
                value = value.get("str") if isinstance(value, Mapping) else value
                if isinstance(value, str):
                    row[key] = value
    log.warning("scan: record %s (position %d) skipped: %s", row["case_id"], row["record_index"], row["status"])


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence shares, leaving each at least its last token."""
    first = seqs[0]
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def _groups(seqs: list[list[list[int]]], share: bool) -> dict[tuple[int, ...], list[tuple[int, int, list[int]]]]:
    """``(record, template, ids)`` items keyed by the token prefix they share (dropped from their ids)."""
    groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for j in range(len(seqs[0])):
        col = [s[j] for s in seqs]
        p = _common_prefix(col) if share and len(col) > 1 else 0
        groups.setdefault(tuple(col[0][:p]), []).extend((r, j, s[p:]) for r, s in enumerate(col))
    return groups


def _prefix_cache(model: nn.Module, module: str, prefix: tuple[int, ...]) -> object | None:
    """The attention cache of ``prefix`` up to the edited layer, or None if the model does not fill one."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    past = DynamicCache()
    try:
        with torch.no_grad(), Trace(model, module, stop=True):
            model(input_ids=torch.tensor([prefix], device=device), **cache_kwargs(model, past))
    except (TypeError, ValueError, AttributeError):  # a model (or transformers version) without this cache
        return None
    return past if past.get_seq_length() == len(prefix) else None


def _forward_keys(model: nn.Module, tok: object, module: str, seqs: list[list[int]],
                  past: object | None = None) -> torch.Tensor:
    """The module's input at each sequence's last token ([n, d_in]), after an optional shared prefix."""
    device = next(model.parameters()).device
    ids, mask = pad_batch(tok, seqs, device)
    kwargs: dict[str, Any] = {"use_cache": False}
    if past is not None:
        cache = copy.deepcopy(past)
        cache.batch_repeat_interleave(len(seqs))
        mask = torch.cat([mask.new_ones(len(seqs), past.get_seq_length()), mask], dim=1)
        kwargs = cache_kwargs(model, cache)
    with torch.no_grad(), Trace(model, module, retain_input=True, stop=True) as tr:
        model(input_ids=ids, attention_mask=mask, **kwargs)
    rows = torch.arange(len(seqs), device=device)
    return tr.input[rows, torch.tensor([len(s) - 1 for s in seqs], device=device)].clone()


def _cache_agrees(model: nn.Module, tok: object, module: str, prefix: tuple[int, ...], ids: list[int],
                  past: object) -> bool:
    """True when the cached prefix gives the key a full forward gives (to the dtype's precision)."""
    cached = _forward_keys(model, tok, module, [ids], past)[0].double()
    full = _forward_keys(model, tok, module, [list(prefix) + ids])[0].double()
    tol = torch.finfo(next(model.parameters()).dtype).eps ** 0.5
    return bool((cached - full).norm() <= tol * full.norm())


def _chunks(items: list[tuple[int, int, list[int]]], batch_size: int, waste: float = 1.25
            ) -> Iterable[list[tuple[int, int, list[int]]]]:
    """Consecutive runs of ``items`` (sorted by length) of at most ``batch_size``, cut early where right
    padding would exceed ``waste`` times the run's real tokens."""
    chunk: list[tuple[int, int, list[int]]] = []
    tokens = 0
    for item in items:
        n = len(item[2])
        if chunk and (len(chunk) == batch_size or (len(chunk) + 1) * n > waste * (tokens + n)):
            yield chunk
            chunk, tokens = [], 0
        chunk.append(item)
        tokens += n
    if chunk:
        yield chunk


def _subject_keys(model: nn.Module, tok: object, module: str, seqs: list[list[list[int]]], batch_size: int,
                  share: bool, progress: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k_u, k̄ and the prefixed mean key of every record ([n, d_in] each, float64)."""
    n, n_templates = len(seqs), len(seqs[0])
    k_u: torch.Tensor | None = None
    k_sum: torch.Tensor | None = None  # Σ over the prefixed templates
    bar = progress_bar(total=n * n_templates, desc=desc, unit="seq", disable=not progress)
    for prefix, items in _groups(seqs, share).items():
        past = _prefix_cache(model, module, prefix) if prefix and share else None
        if prefix and share and (past is None or not _cache_agrees(model, tok, module, prefix, items[0][2], past)):
            log.warning("scan: the model's attention cache disagrees with a full forward; "
                        "every sequence is run from its first token")
            share, past = False, None
        if prefix and past is None:
            items = [(r, j, list(prefix) + ids) for r, j, ids in items]
        for chunk in _chunks(sorted(items, key=lambda it: len(it[2])), batch_size):
            keys = _forward_keys(model, tok, module, [ids for _, _, ids in chunk], past)
            if k_u is None:
                k_u = keys.new_zeros(n, keys.shape[1])
                k_sum = torch.zeros(n, keys.shape[1], dtype=torch.float64, device=keys.device)
            rec = torch.tensor([r for r, _, _ in chunk], device=keys.device)
            unprefixed = torch.tensor([j == 0 for _, j, _ in chunk], device=keys.device)
            k_u[rec[unprefixed]] = keys[unprefixed]
            k_sum.index_add_(0, rec[~unprefixed], keys[~unprefixed].double())
            bar.update(len(chunk))
    bar.close()
    k_u64 = k_u.double()
    k_pre = k_sum / (n_templates - 1) if n_templates > 1 else k_u64
    return k_u64, (k_u64 + k_sum) / n_templates, k_pre


def _signals(k_u: torch.Tensor, k_bar: torch.Tensor, k_pre: torch.Tensor, stats: LayerStats | None,
             consistent: bool) -> dict[str, np.ndarray]:
    """The ROME-family key signals of every record (rows of the [n, d_in] inputs), as ``rome.py`` logs them."""
    if stats is not None:
        dev = stats.mom2.device
        k_u, k_bar, k_pre = k_u.to(dev), k_bar.to(dev), k_pre.to(dev)

        def c_inv(x: torch.Tensor) -> torch.Tensor:
            return stats.solve(x.T).T
    else:
        def c_inv(x: torch.Tensor) -> torch.Tensor:
            return x
    ci = c_inv(k_bar)
    u = ci / ci.norm(dim=1, keepdim=True)
    den_u, den_bar = (k_u * u).sum(1), (k_bar * u).sum(1)
    out = {"denominator": den_bar if consistent else den_u,
           "denominator_consistent": den_bar,
           "denominator_ratio": den_u / den_bar,
           "key_cosine": torch.nn.functional.cosine_similarity(k_u, k_bar, dim=1),
           "key_norm_unprefixed": k_u.norm(dim=1),
           "key_norm_mean": k_bar.norm(dim=1),
           "key_norm_prefixed": k_pre.norm(dim=1),
           "key_mahalanobis_unprefixed": (k_u * c_inv(k_u)).sum(1).clamp_min(0).sqrt(),
           "key_mahalanobis_prefixed": (k_pre * c_inv(k_pre)).sum(1).clamp_min(0).sqrt()}
    return {k: v.cpu().numpy() for k, v in out.items()}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a typed frame, ranked and sorted by risk."""
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "risk_rank"])
    bad = (df["status"] != "ok").to_numpy()
    den = np.abs(df["denominator"].to_numpy(dtype=float))
    order = np.lexsort((df["record_index"].to_numpy(), np.where(np.isnan(den), np.inf, den), np.isnan(den), bad))
    df = df.iloc[order].reset_index(drop=True)
    df.insert(0, "risk_rank", np.arange(1, len(df) + 1))
    return df.astype(DTYPES)


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".meta.json")


def write_scan(df: pd.DataFrame, path: str | os.PathLike) -> pathlib.Path:
    """Write a scan as CSV or parquet (by the extension); its ``attrs`` go to ``<path>.meta.json`` and, for
    parquet, also into the file's schema metadata. Returns the path."""
    p = pathlib.Path(path)
    meta = json.dumps(df.attrs, default=str, indent=1)
    ext = p.suffix.lower()
    if ext == ".csv":
        df.to_csv(p, index=False)
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), PARQUET_KEY: meta.encode()})
        pq.write_table(table, p)
    else:
        raise CollapseDiagError(f"scan files are .csv or .parquet, got {p.name!r}")
    _sidecar(p).write_text(meta, encoding="utf-8")
    return p


def read_scan(path: str | os.PathLike) -> pd.DataFrame:
    """Read a scan written by ``write_scan``, with its column types and ``attrs`` restored."""
    p = pathlib.Path(path)
    ext = p.suffix.lower()
    attrs = None
    if ext == ".csv":
        df = pd.read_csv(p, keep_default_na=False, na_values=[""], dtype={c: "string" for c in TEXT_COLUMNS})
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        meta = (table.schema.metadata or {}).get(PARQUET_KEY)
        attrs = json.loads(meta) if meta else None
        df = table.to_pandas()
    else:
        raise CollapseDiagError(f"scan files are .csv or .parquet, got {p.name!r}")
    if attrs is None and _sidecar(p).exists():
        attrs = json.loads(_sidecar(p).read_text(encoding="utf-8"))
    df = df.astype({c: t for c, t in DTYPES.items() if c in df.columns})
    df.attrs = attrs or {}
    return df

"""The saved-run schema: every table, column, type and unit (source of docs/SCHEMA.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Column:
    """One column of a run table."""

    name: str
    dtype: str  # int | float | bool | str
    unit: str
    description: str
    editors: str = "all"  # which editors fill it: all | rome family | batched | emmet | d4s | alphaedit
    nullable: bool = True  # may be null on disk: missing (e.g. a failed edit, another editor) or not finite


# Columns that every row of its table holds, with a finite value; every other column may be null.
REQUIRED = {
    "edits": {"edit_index", "case_id", "batch_index", "batch_size", "seconds", "status"},
    "layers": {"edit_index", "batch_index", "layer", "module", "weight_l1", "weight_fro", "delta_l1", "delta_fro",
               "drift_fro", "drift_l1"},
    "evals": {"edit_index", "n_edits", "n_retention", "seconds"},
    "retention": {"checkpoint", "edit_index", "case_id", "p_new", "p_true", "success"},
    "downstream": {"edit_index", "task", "n", "accuracy", "chance", "seconds"},
    "guard": {"edit_index", "case_id", "layer", "risky", "action"},
}


def _c(name: str, dtype: str, unit: str, description: str, editors: str = "all") -> Column:
    return Column(name, dtype, unit, description, editors)


def _table(name: str, cols: list[Column]) -> list[Column]:
    return [Column(c.name, c.dtype, c.unit, c.description, c.editors, c.name not in REQUIRED[name]) for c in cols]


EDITS = [
    _c("edit_index", "int", "-", "0-based position of the edit in the run"),
    _c("case_id", "str", "-", "record id from the data set"),
    _c("subject", "str", "-", "subject string"),
    _c("prompt", "str", "-", "prompt template, `{}` marks the subject"),
    _c("target_new", "str", "-", "object written by the edit"),
    _c("target_true", "str", "-", "true object before the edit"),
    _c("batch_index", "int", "-", "index of the update (batch) this edit belongs to"),
    _c("batch_size", "int", "count", "number of edits in that batch (1 in sequential mode)"),
    _c("subject_first_token", "bool", "-",
       "the subject starts at the first non-special token of the unprefixed prompt"),
    _c("subject_last_piece", "str", "-", "decoded token at the subject's last position (the edited key)"),
    _c("p_new_before", "float", "probability", "exp(mean token log-likelihood) of ` target_new` before the edit"),
    _c("p_true_before", "float", "probability", "same for ` target_true` before the edit"),
    _c("p_new_after", "float", "probability", "p of ` target_new` after the edit"),
    _c("p_true_after", "float", "probability", "p of ` target_true` after the edit"),
    _c("efficacy", "bool", "-", "p_new_after > p_true_after"),
    _c("paraphrase_score", "float", "fraction",
       "share of paraphrase prompts with p_new > p_true after the edit (null if none)"),
    _c("neighborhood_score", "float", "fraction",
       "share of neighborhood prompts with p_true > p_new after the edit (null if none)"),
    _c("seconds", "float", "s",
       "wall time of computing, applying and scoring the edit (its batch's time shared evenly by its edits)"),
    _c("status", "str", "-", "`ok`, or the error that stopped this edit (weights untouched)"),
]

LAYERS = [
    _c("edit_index", "int", "-", "edit this row belongs to (the last edit of its batch)"),
    _c("batch_index", "int", "-", "batch (update) this row belongs to"),
    _c("layer", "int", "-", "edited layer"),
    _c("module", "str", "-", "dotted name of the edited projection"),
    _c("weight_l1", "float", "mean |w|", "‖W‖₁ / numel(W) after the edit"),
    _c("weight_fro", "float", "norm", "‖W‖_F after the edit"),
    _c("delta_l1", "float", "mean |w|", "‖ΔW‖₁ / numel(W) of this edit's update"),
    _c("delta_fro", "float", "norm", "‖ΔW‖_F of this edit's update"),
    _c("update_ratio", "float", "ratio", "‖ΔW‖_F / ‖W‖_F of the weights before this update (a disabling ROME edit "
       "writes an update several times the matrix's own norm)"),
    _c("drift_fro", "float", "norm / numel", "‖W − W₀‖_F / numel(W): distance from the unedited weights"),
    _c("drift_l1", "float", "mean |w|", "‖W − W₀‖₁ / numel(W) (D4S's delta_nom_1: the total change so far)"),
    _c("update_rank", "int", "count", "rank of the observed weight change (singular values above 1e-6 of the largest)",
       "watched"),
    _c("weight_sigma1", "float", "norm", "σ₁(W): spectral norm of the edited matrix after the update (warm-started "
       "subspace iteration, relative tolerance 1e-5)"),
    _c("weight_sigma1_ratio", "float", "ratio", "σ₁(W) / σ₁(W₀): spectral-norm growth since the unedited weights"),
    _c("drift_sigma1", "float", "norm", "σ₁(W − W₀): largest singular value of the accumulated change"),
    _c("drift_concentration", "float", "ratio",
       "σ₁(W − W₀) / ‖W − W₀‖_F (1: the whole change is one direction; null before any change)"),
    _c("drift_entropy", "float", "nats",
       "spectral entropy of W − W₀ over its top 8 singular values, pᵢ = σᵢ²/Σⱼσⱼ² (0: one direction; at most "
       "log 8 = 2.08)"),
    _c("weight_energy", "float", "energy",
       "hyperspherical energy of W's normalised rows (SPHERE): mean over row pairs i ≠ j of 1/‖ŵᵢ − ŵⱼ‖"),
    _c("weight_energy_ratio", "float", "ratio", "weight_energy / its value on W₀ (1: the rows as spread as before)"),
    _c("weight_condition", "float", "ratio",
       "cond(W) = σ_max/σ_min of the edited matrix (PRUNE); only on the last batch before each periodic checkpoint (every `eval_every` edits)",
       "all, at checkpoints"),
    _c("denominator", "float", "key units",
       "the method's scalar denominator (ROME k_uᵀu, r-ROME k̄ᵀu; batched methods: smallest eigenvalue of the "
       "n×n matrix KᵀA⁻¹K (MEMIT: A = λC + KKᵀ; D4S: A = λC + ΣKKᵀ), D (EMMET), or K̃ᵀG⁻¹K̃ with K̃ = UᵀK "
       "(AlphaEdit))"),
    _c("condition", "float", "ratio",
       "condition number of the matrix the method inverts (C for ROME, λC + KKᵀ for MEMIT, λC + ΣKKᵀ for D4S, "
       "D for EMMET, G = Uᵀ(KKᵀ + K_pK_pᵀ)U + αI for AlphaEdit)"),
    _c("denominator_consistent", "float", "key units", "k̄ᵀu: the denominator with the prefix-averaged key", "rome family"),
    _c("denominator_unprefixed", "float", "key units",
       "k_uᵀu: the denominator with the unprefixed key (ROME's; recorded for r-ROME too, which does not divide by it)",
       "rome family"),
    _c("key_norm_unprefixed", "float", "norm", "‖k_u‖: key of the prompt without prefix", "rome family"),
    _c("key_norm_prefixed", "float", "norm", "‖mean of the prefixed keys‖", "rome family"),
    _c("key_cosine", "float", "cosine", "cos(k_u, k̄)", "rome family"),
    _c("key_mahalanobis_unprefixed", "float", "norm", "√(k_uᵀ C⁻¹ k_u)", "rome family"),
    _c("key_mahalanobis_prefixed", "float", "norm", "√(k_pᵀ C⁻¹ k_p), k_p = mean prefixed key", "rome family"),
    _c("v_delta_norm", "float", "norm", "‖δ‖ = ‖v* − v_init‖"),
    _c("v_delta_ratio", "float", "ratio", "‖δ‖ / ‖v_init‖ (the clamp caps it)"),
    _c("v_star_norm", "float", "norm", "‖v*‖ = ‖v_init + δ‖: norm of the target value (batched: mean over the batch)"),
    _c("v_star_ratio", "float", "ratio", "‖v*‖ / ‖v_init‖ (batched: mean over the batch); its growth over a run is "
       "the value-norm feedback loop"),
    _c("v_steps", "int", "steps", "gradient steps taken by the target optimisation"),
    _c("v_mpes_step", "float", "steps", "step at which most-probable early stopping ended the target optimisation "
       "(hparam `mpes`; batched: mean over the batch's edits where it fired; null where it did not)",
       "encore, any with mpes"),
    _c("v_loss", "float", "nats", "final loss of the target optimisation (NLL + KL + decay)"),
    _c("v_nll", "float", "nats", "final mean target NLL over the prefixed prompts"),
    _c("v_kl", "float", "nats", "final weighted KL term"),
    _c("z_error", "float", "norm", "mean ‖z − h‖ at the last edited layer before this layer's update (D4S: on W₀)",
       "batched"),
    _c("pinv_fallback", "bool", "-", "D was singular and its pseudo-inverse was used", "emmet"),
    _c("condition_c", "float", "ratio", "condition number of λ_m C + μI", "emmet"),
    _c("projector_rank", "int", "count", "rank of the null-space projector P (eigenvalues of C below the threshold)",
       "alphaedit"),
    _c("cache_trace", "float", "key units²", "trace of Σ K Kᵀ over the edits so far, this batch included",
       "d4s, alphaedit"),
]

EVALS = [
    _c("edit_index", "int", "-", "last edit applied before this checkpoint (−1: the unedited baseline)"),
    _c("n_edits", "int", "count", "edits applied so far"),
    _c("n_retention", "int", "count",
       "rows this checkpoint wrote to `retention` (resume checks them; absent in runs written before it existed)"),
    _c("n_done", "int", "count", "successful edits before this checkpoint (the retention rows test all of them "
       "when `retention_sample` is 0 or larger than the older ones)"),
    _c("retention", "float", "fraction", "share of the re-tested successful edits still successful (p_new > p_true): "
       "a broken model can still rank the two, so retention can stay high while perplexity is high"),
    _c("efficacy", "float", "fraction", "efficacy over earlier edits"),
    _c("paraphrase_score", "float", "fraction", "paraphrase score over earlier edits"),
    _c("neighborhood_score", "float", "fraction", "neighborhood score over earlier edits"),
    _c("perplexity", "float", "ppl", "perplexity on held-out text"),
    _c("generation_entropy", "float", "bits", "weighted 2/3-gram entropy of seeded generations"),
    _c("seconds", "float", "s", "wall time of this evaluation"),
]

RETENTION = [
    _c("checkpoint", "int", "-", "edit_index of the evaluation checkpoint"),
    _c("edit_index", "int", "-", "earlier edit being re-tested"),
    _c("case_id", "str", "-", "its record id"),
    _c("p_new", "float", "probability", "p of ` target_new` at the checkpoint"),
    _c("p_true", "float", "probability", "p of ` target_true` at the checkpoint"),
    _c("success", "bool", "-", "p_new > p_true at the checkpoint"),
    _c("recent", "bool", "-", "edited since the previous checkpoint (always re-tested); false: one of the at most "
       "`retention_sample` older edits drawn for this checkpoint (config `retention_sample`; 0 = all)"),
]

DOWNSTREAM = [
    _c("edit_index", "int", "-", "checkpoint: last edit applied before it (−1: the unedited model)"),
    _c("task", "str", "-", "downstream task (`--downstream`: a built-in name or NAME=spec.json)"),
    _c("n", "int", "count", "examples scored (the same seeded subset at every checkpoint; never a demonstration)"),
    _c("accuracy", "float", "fraction", "share of examples whose answer word has the largest summed log-probability "
       "after the few-shot prompt"),
    _c("f1", "float", "fraction", "F1 of the spec's `positive` label (null unless the spec asks for it: mrpc, cola)"),
    _c("mcc", "float", "correlation", "Matthews correlation (null unless the spec asks for it: mrpc, cola)"),
    _c("chance", "float", "fraction", "accuracy of always giving the subset's most common answer (1/answers when "
       "balanced); a task whose unedited 95 % Wilson interval holds it is uninformative"),
    _c("seconds", "float", "s", "wall time of scoring this task at this checkpoint"),
]

GUARD = [
    _c("edit_index", "int", "-", "the edit the request was given (its `edits` row exists once the update is made "
       "or the request left out)"),
    _c("case_id", "str", "-", "its record id"),
    _c("layer", "int", "-", "the layer whose keys were read (the editor's first edited layer)"),
    _c("denominator", "float", "key units", "k_uᵀû with û = C⁻¹k̄/‖C⁻¹k̄‖, on the weights before the edit (ROME's "
       "denominator)"),
    _c("denominator_consistent", "float", "key units", "k̄ᵀû (r-ROME's denominator)"),
    _c("denominator_ratio", "float", "ratio", "k_uᵀû / k̄ᵀû: ROME's update over the prefix-consistent one, inverted"),
    _c("key_cosine", "float", "cosine", "cos(k_u, k̄) of the unprefixed and the prefix-averaged key"),
    _c("subject_first_token", "bool", "-", "the subject starts the prompt"),
    _c("subject_last_position", "int", "-", "index of the subject's last token in the unprefixed prompt"),
    _c("risky", "bool", "-", "the guard's rule fired: |denominator_ratio| < config `guard.min_ratio`"),
    _c("reason", "str", "-", "why it fired (null when not risky)"),
    _c("action", "str", "-", "`warned` (edit made), `skipped` (left out: `--guard skip`) or `none`"),
]

EDITS, LAYERS, EVALS, RETENTION, DOWNSTREAM, GUARD = (
    _table(n, t) for n, t in (("edits", EDITS), ("layers", LAYERS), ("evals", EVALS), ("retention", RETENTION),
                              ("downstream", DOWNSTREAM), ("guard", GUARD)))
TABLES: dict[str, list[Column]] = {"edits": EDITS, "layers": LAYERS, "evals": EVALS, "retention": RETENTION,
                                   "downstream": DOWNSTREAM, "guard": GUARD}


def nullable(table: str) -> list[str]:
    """Columns of ``table`` that may be ``null`` on disk (``read_table`` gives NaN for them)."""
    return [c.name for c in TABLES[table] if c.nullable]


def columns(table: str) -> list[str]:
    """Column names of ``table`` in order."""
    return [c.name for c in TABLES[table]]


def as_dict() -> dict:
    """The schema as plain data (written into every run as schema.json)."""
    return {t: [asdict(c) for c in cols] for t, cols in TABLES.items()}


def markdown() -> str:
    """The schema document (docs/SCHEMA.md)."""
    out = ["# Saved-run schema", "",
           "Missing and not-finite values (NaN, ±infinity) are written as JSON `null` in every table and in",
           "`config.json` (strict JSON: never a bare `NaN` or `Infinity`); `load_run` reads `null` back as NaN in",
           "numeric columns (and still reads runs written before, which hold `NaN`). The column *null* below says",
           "which columns may hold it.", "",
           "A run is a directory: `config.json`, one JSON Lines file per table below (`<table>.jsonl`,",
           "`pandas.read_json(path, lines=True, precise_float=True)` reads it), `schema.json` (this document as data) and",
           "`factors/batch_NNNNNN.npz` (the update factors of each batch, i.e. of each edit in sequential mode:",
           "arrays `left_<layer>` [d_out, r] and `right_<layer>` [d_in, r], ΔW = left @ rightᵀ in Linear",
           "orientation; D4S and AlphaEdit add `state_keys_<layer>` (and D4S `state_resid_<layer>`), the K and R",
           "that rebuild their running sums on resume).",
           "Rows are appended as the run goes; a `layers` row counts only once its `edits` row exists.",
           "Resuming a cut run keeps its whole batches up to the first checkpoint that is missing or incomplete",
           "(`evals.n_retention` counts its `retention` rows), redoes that checkpoint and edits the rest again, so",
           "no (checkpoint, edit_index) pair ever appears twice. A checkpoint writes its `downstream` rows (runs",
           "with `--downstream`) before its `evals` row, so resuming keeps them only for complete checkpoints.",
           "Generated from `collapsediag/runs/schema.py` (`python -m collapsediag.runs.schema`).", ""]
    for table, cols in TABLES.items():
        out += [f"## `{table}`", "", "| column | type | null | unit | editors | meaning |",
                "|---|---|---|---|---|---|"]
        out += [f"| `{c.name}` | {c.dtype} | {'yes' if c.nullable else 'no'} | {c.unit} | {c.editors} | "
                f"{c.description} |" for c in cols]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")

"""Forward passes that compute logits only at the positions a loss or score reads."""
from __future__ import annotations

import inspect

import torch
from torch import nn

# Families whose base model applies the final norm itself, so lm_head(hidden) == logits.
PLAIN_HEAD = {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"}


def cache_kwargs(model: nn.Module, cache: object) -> dict[str, object]:
    """Forward arguments that pass a key/value ``cache``: ``cache=`` where the model's forward takes it
    (current transformers), else the older ``past_key_values=``; with ``use_cache=True``."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}


def _hidden_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor, **forward_kwargs: object) -> torch.Tensor:
    """The base model's last hidden state at ``(rows[i], cols[i])`` (``PLAIN_HEAD`` families)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                            **forward_kwargs).last_hidden_state[rows, cols]


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor, **forward_kwargs: object) -> torch.Tensor:
    """Logits at positions ``(rows[i], cols[i])``: shape [len(rows), vocab].

    Runs the base model and applies the unembedding only at the requested positions;
    falls back to full logits for families with extra logit processing. ``forward_kwargs`` (e.g.
    ``position_ids``, ``cache_kwargs``) go to the forward call.
    """
    if model.config.model_type in PLAIN_HEAD:
        return model.get_output_embeddings()(_hidden_at(model, input_ids, attention_mask, rows, cols, **forward_kwargs))
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    return logits[rows, cols]


def token_nll_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, targets: torch.Tensor, chunk: int = 64) -> float:
    """Σ −log p(targets[i] | prefix up to (rows[i], cols[i])), with the unembedding applied ``chunk``
    positions at a time so a long batch never holds every position's logits (49k floats each)."""
    if model.config.model_type not in PLAIN_HEAD:
        logits = logits_at(model, input_ids, attention_mask, rows, cols)
        return float(nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
    hidden = _hidden_at(model, input_ids, attention_mask, rows, cols)
    head = model.get_output_embeddings()
    total = 0.0
    for s in range(0, len(rows), chunk):
        logits = head(hidden[s:s + chunk])
        total += float(nn.functional.cross_entropy(logits.float(), targets[s:s + chunk], reduction="sum"))
    return total

"""Forward passes that compute logits only at the positions a loss or score reads."""
from __future__ import annotations

import torch
from torch import nn

# Families whose base model applies the final norm itself, so lm_head(hidden) == logits.
PLAIN_HEAD = {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"}


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor, **forward_kwargs: object) -> torch.Tensor:
    """Logits at positions ``(rows[i], cols[i])``: shape [len(rows), vocab].

    Runs the base model and applies the unembedding only at the requested positions;
    falls back to full logits for families with extra logit processing. ``forward_kwargs`` (e.g.
    ``position_ids``, ``past_key_values``) go to the forward call.
    """
    if model.config.model_type in PLAIN_HEAD:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  **forward_kwargs).last_hidden_state
        return model.get_output_embeddings()(hidden[rows, cols])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs).logits
    return logits[rows, cols]

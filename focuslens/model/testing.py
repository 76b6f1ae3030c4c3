"""Tiny random models with an offline word-level tokenizer, for fast unit tests.

They exercise shapes, GQA and hooks exactly like a real model (same bridge components),
in a fraction of a second and without any network.

>>> model = tiny_model("qwen2", n_heads=4, n_kv_heads=1)     # doctest: +SKIP
"""

from __future__ import annotations

import string

import torch

from focuslens.data.synthetic import synthetic_vocabulary
from focuslens.errors import ModelError
from focuslens.model.load import load_model

__all__ = ["tiny_model", "tiny_tokenizer", "ARCHITECTURES"]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")
_SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(extra_words: list[str] | None = None):
    """A word-level fast tokenizer (whitespace + punctuation split) with a chat template.

    Its vocabulary covers every word of the synthetic task, plus ``extra_words``; every
    punctuation mark and digit is its own token, so rendered prompts have no ``<unk>``.
    """

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast


    words = synthetic_vocabulary() + list(extra_words or []) + list(string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(_SPECIAL + words))}
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wl,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=_SPECIAL[4:],
        add_bos_token=True,
    )
    tok.chat_template = _CHAT_TEMPLATE
    tok.init_kwargs["name_or_path"] = "focuslens-tiny-wordlevel"
    return tok


def tiny_model(
    arch: str = "llama",
    *,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_head: int = 16,
    d_mlp: int = 128,
    seed: int = 0,
    tokenizer=None,
):
    """A random-init TransformerBridge (float32, CPU) of a supported architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM


    if arch not in ARCHITECTURES:
        raise ModelError(f"arch={arch!r} is not one of {ARCHITECTURES}.")
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1:
        raise ModelError(f"n_kv_heads={n_kv_heads!r} must be a positive integer (1 for multi-query attention).")
    if n_heads % n_kv_heads:
        raise ModelError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}.")
    tok = tokenizer or tiny_tokenizer()
    # Gemma 3 (text): QK-norm, embeddings scaled by √d_model, one RoPE table per layer type and
    # a sliding window on every other layer (layer 0 sliding, as Gemma's); a window of 8
    # tokens, and a local RoPE base of 180: its lowest frequency (d_head 16) passes π at
    # position 296 and 2π only past the 512-token context, as Gemma 3 270M's passes π
    # within its context (29k of 32k)
    gemma = {"layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
             "sliding_window": 8, "max_position_embeddings": 512, "query_pre_attn_scalar": d_head,
             "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 180.0},
                                 "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    rest = gemma if arch == "gemma3" else {"rope_theta": 10000.0, "max_position_embeddings": 4096}
    cfg = AutoConfig.for_model(
        "gemma3_text" if arch == "gemma3" else arch,
        vocab_size=len(tok),
        hidden_size=n_heads * d_head,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_head,
        **rest,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "gemma3":
        cfg.architectures = ["Gemma3ForCausalLM"]  # what the bridge picks its adapter by
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.config.name_or_path = f"tiny-{arch}-L{n_layers}H{n_heads}KV{n_kv_heads}"
    return load_model(hf, tokenizer=tok, device="cpu", dtype=torch.float32)

"""Span mass from log-sum-exp and split-softmax as two masked attention calls, checked
against the bridge's eager pattern and head outputs (docs/scaling.md)."""

from __future__ import annotations

import pytest
import torch
from conftest import get_tiny
from fused_reference import span_mass_lse, split_softmax_attention

from focuslens.data.render import render
from focuslens.data.synthetic import make_synthetic_qa
from focuslens.model.hooks import attn_hook
from focuslens.model.load import attention_scaling
from focuslens.steer.split_softmax import split_softmax_hooks

LAYER = 1


def _capture(model, ids, hooks=()):
    got = {}
    keep = lambda name: lambda x, hook: got.__setitem__(name, x.detach().clone())  # noqa: E731
    names = {p: attn_hook(LAYER, p) for p in ("rot_q", "rot_k", "pattern", "z")} | {"v": f"blocks.{LAYER}.attn.hook_v"}
    model.run_with_hooks(ids, fwd_hooks=[*hooks, *[(n, keep(p)) for p, n in names.items()]])
    return got


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_lse_span_mass_and_two_call_split_softmax_equal_the_eager_bridge(arch, kv):
    model = get_tiny(arch, kv)
    prompt = render(make_synthetic_qa(1, n_documents=4, seed=7)[0], model.tokenizer)
    ids, T = prompt.input_ids[None], prompt.n_tokens
    span = torch.zeros(1, T, dtype=torch.bool)
    span[0, prompt.gold.to_slice()] = True
    scale = attention_scaling(model)
    plain = _capture(model, ids)
    q, k, v = (plain[n].transpose(1, 2) for n in ("rot_q", "rot_k", "v"))  # [b, head, pos, d]
    pi = span_mass_lse(q, k, span, scale)
    torch.testing.assert_close(pi, plain["pattern"][..., span[0]].sum(-1), atol=1e-5, rtol=1e-4)
    # split-softmax on every head of the layer, one tau per head (tau 1 = untouched)
    tau = torch.tensor([0.2, 0.5, 1.0, 0.05])
    heads = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.bool)
    heads[LAYER] = True
    hooks = []
    for h, t in enumerate(tau.tolist()):
        head_mask = torch.zeros_like(heads)
        head_mask[LAYER, h] = True
        hooks += split_softmax_hooks(model, head_mask, prompt.gold, t)
    steered = _capture(model, ids, hooks)
    # the layer's inputs are unchanged (earlier layers are not steered); its outputs are
    torch.testing.assert_close(steered["rot_q"], plain["rot_q"])
    z = split_softmax_attention(q, k, v, span, tau, scale)
    torch.testing.assert_close(z.transpose(1, 2), steered["z"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(steered["z"], plain["z"], atol=1e-3)  # the steering moved the outputs
    torch.testing.assert_close(split_softmax_attention(q, k, v, span, 1.0, scale).transpose(1, 2), plain["z"],
                               atol=1e-5, rtol=1e-4)

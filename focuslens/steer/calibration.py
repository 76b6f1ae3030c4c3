"""Positional attention calibration (Hsieh et al. 2024, "Found in the Middle: Calibrating
Positional Attention Bias Improves Long Context Utilization", ACL Findings 2024, arXiv
2406.16008): a head's attention to document k is modelled as relevance plus a bias of
slot k; the bias is what a content-free document gets in that slot, so subtracting it
leaves attention that follows relevance. Label-free: the documents' boundaries are known,
which one is relevant is not.

At every answer row of each chosen head, with ``m_k`` the mass on document k and ``b_k``
the content-free mass of slot k scaled to the document's length (``per_token[slot] ·
|doc_k|``, a :class:`~focuslens.measure.position.PositionProfile` measured on calibration
prompts)::

    c_k  = max(m_k − b_k, 0)                # calibrated attention
    m'_k = M · c_k / Σ c                    # redistributed, total document mass M = Σ m kept
    m''_k = (1 − t)·m_k + t·m'_k            # strength t: 0 changes nothing, 1 is full calibration

and document k's keys are scaled by ``m''_k / m_k`` (weights inside a document and outside
the documents are kept). Rows whose calibrated mass is all zero are left alone.

Reproduced: the slot bias estimated with a content-free document at the same position and
subtracted from the attention per head. Adapted: Hsieh et al. calibrate the attention used
to re-rank and then re-weight documents in the model's attention, at chosen layers; here the
redistribution keeps each row's total document mass (so instruction, question and sink keep
theirs), acts at the answer rows only (the rows the profile is measured at, so one prefill
serves every variant) and on the top k heads of a ranking or every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from focuslens.errors import DataError
from focuslens.measure.position import PositionProfile
from focuslens.model.heads import HookSpec
from focuslens.model.hooks import HeadEdit, attn_hook, key_indicator
from focuslens.model.intervention import HeadIntervention
from focuslens.model.spans import first_row, resolve_rows, rows_mask

__all__ = ["PositionCalibration", "calibrate_masses"]


def calibrate_masses(m: Tensor, baseline: Tensor, strength: Tensor) -> Tensor:
    """New document masses (module docstring): ``m`` ``[..., doc]`` the current masses,
    ``baseline`` ``[..., doc]`` the slot bias, ``strength`` broadcast over ``[...]``."""
    c = (m - baseline).clamp_min(0)
    total, c_sum = m.sum(-1, keepdim=True), c.sum(-1, keepdim=True)
    redistributed = torch.where(c_sum > 0, total * c / c_sum.clamp_min(1e-30), m)
    t = strength[..., None]
    return (1 - t) * m + t * redistributed


@dataclass
class PositionCalibration(HeadIntervention):
    """Found-in-the-Middle calibration as a value (module docstring).

    Attributes:
        profile: the content-free :class:`~focuslens.measure.position.PositionProfile`
            (same number of documents as the prompts it is applied to).
        heads: any selection (an int is the top k of ``ranking``; default every head).
        strength: t in [0, 1], one value or one per variant (0 changes nothing).
        rows: ``"answer"`` (the only setting: the profile is measured there).
    """

    profile: PositionProfile
    heads: object = "all"
    ranking: object = None
    strength: object = 1.0
    rows: object = "answer"

    STRENGTH = "strength"
    METHOD, NEEDS_LABEL = "calibration", False
    PAPER = "Hsieh et al. 2024, Found in the Middle (ACL Findings 2024, arXiv 2406.16008)"

    def __post_init__(self) -> None:
        if self.rows != "answer":
            raise DataError(f"rows={self.rows!r}: the positional profile is measured at the answer rows, so the "
                            "calibration acts there (rows='answer').")
        if not self.profile.metadata.get("content_free", True):
            raise DataError("the calibration subtracts a content-free profile: measure it with content_free=True.")
        values = torch.as_tensor(self.strength, dtype=torch.float32).flatten()
        if not torch.isfinite(values).all() or ((values < 0) | (values > 1)).any():
            raise DataError(f"strength={values.tolist()}: the calibration strength is in [0, 1] (0 changes nothing).")

    @classmethod
    def candidates(cls, context):
        if not context.calibration:
            return []
        profile = context.profile(content_free=True)
        return [({"heads": "all", "strength": t}, cls(profile, "all", strength=t)) for t in (0.5, 1.0)] + \
               [({"heads": context.k, "strength": 1.0}, cls(profile, context.k, context.ranking, strength=1.0))]

    def variant_hooks(self, model, prompt, masks: Tensor, strength: Tensor) -> list[HookSpec]:
        if prompt is None:
            raise DataError("PositionCalibration needs the prompt (its documents and answer rows).")
        n = len(prompt.documents)
        if n != self.profile.n_documents:
            raise DataError(f"the profile has {self.profile.n_documents} document slots, the prompt {n}: measure the "
                            "profile on prompts of the same size.")
        where = resolve_rows("answer", prompt)
        lengths = torch.tensor([len(s) for s in prompt.documents], dtype=torch.float32)
        baseline_all = self.profile.per_token * lengths  # [layer, head, doc]
        docs = list(prompt.documents)
        hooks = []
        for layer in masks.any(0).any(-1).nonzero().flatten().tolist():
            chosen = masks[:, layer]  # [variant, head]
            layer_t = torch.where(chosen, strength[:, None], torch.zeros(()))  # [variant, head]
            hooks.append((attn_hook(layer, "pattern"), self._edit(layer_t, baseline_all[layer], docs, where)))
        return hooks

    @staticmethod
    def _edit(layer_t: Tensor, baseline: Tensor, docs, where) -> HeadEdit:

        def edit(pattern, query_rows, heads):
            """``pattern`` [batch, len(heads), rows, key] at absolute ``query_rows``."""
            b, k = pattern.shape[0], pattern.shape[-1]
            if layer_t.shape[0] not in (1, b):
                raise DataError(f"{layer_t.shape[0]} calibration variants for a batch of {b}.")
            p = pattern.float()
            ind = key_indicator(k, [[d] for d in docs]).to(p.device)  # [key, doc]
            m = p @ ind  # [batch, head, rows, doc]
            t = layer_t.to(p.device)[:, heads]  # [variant, head]
            t = torch.where(rows_mask(where, query_rows)[None, None, :], t[:, :, None], torch.zeros(()))
            new = calibrate_masses(m, baseline[heads].to(p.device)[None, :, None, :], t)
            scale = torch.where(m > 0, new / m.clamp_min(1e-30), torch.ones_like(m))  # [batch, head, rows, doc]
            key_scale = 1 + (scale - 1) @ ind.T  # 1 outside the documents
            return (p * key_scale).to(pattern.dtype)

        def hook(pattern, hook):
            q, k = pattern.shape[-2:]
            return edit(pattern, torch.arange(k - q, k, device=pattern.device), slice(None))

        return HeadEdit(hook, layer_t != 0, first_row(where), edit)

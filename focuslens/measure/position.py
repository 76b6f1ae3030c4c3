"""Positional attention profiles: how much attention each document *slot* gets, whatever
the document says.

Lost in the Middle (Liu et al. 2024) found a U-shaped accuracy curve over the gold
document's position; Hsieh et al. (2024, "Found in the Middle: Calibrating Positional
Attention Bias Improves Long Context Utilization", arXiv 2406.16008) traced it to a
U-shaped *attention* bias that does not depend on relevance, and Yi et al. (2025,
"Attention Basin", arXiv 2508.05128) to a preference for the start and end of a list. Both
estimate the bias on a few calibration prompts, then correct for it:

* :func:`position_profile` with ``content_free=True`` measures it as Hsieh et al. do: every
  document replaced by a content-free one (``"N/A"`` words, the document's own length), so
  what remains is position; the calibration of
  :class:`~focuslens.steer.calibration.PositionCalibration` subtracts it;
* with ``content_free=False`` it is the mean attention on real documents by slot, the
  profile AttnRank (:class:`~focuslens.steer.reorder.AttnRank`) sorts slots by.

The masses are read at the answer rows by the one recorder, per head, and divided by each
slot's token count (``per_token``: a long document is not "preferred" for being long).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from focuslens.data.examples import Document, QAExample
from focuslens.data.render import render
from focuslens.errors import DataError
from focuslens.measure.record import Recording
from focuslens.model.load import model_id
from focuslens.progress import tqdm

__all__ = ["PositionProfile", "position_profile", "content_free_document"]

#: The content-free word a document is filled with (ICR's content-free query, Chen et al. 2025).
CONTENT_FREE = "N/A"


def content_free_document(doc: Document) -> Document:
    """A document of the same number of words with no content: title and words ``"N/A"``."""
    return Document(CONTENT_FREE, " ".join([CONTENT_FREE] * max(1, len(doc.text.split()))))


@dataclass
class PositionProfile:
    """Attention by document slot at the answer rows, per head.

    Attributes:
        mass: ``[layer, head, slot]`` mean mass on the document in each slot.
        per_token: ``[layer, head, slot]`` the same divided by the slot's token count
            (mean over prompts of the per-prompt ratio).
        metadata: model, n_prompts, n_documents, content_free.
    """

    mass: Float[Tensor, "layer head slot"]
    per_token: Float[Tensor, "layer head slot"]
    metadata: dict = field(default_factory=dict)

    @property
    def n_documents(self) -> int:
        return int(self.mass.shape[-1])

    def slot_order(self) -> list[int]:
        """Slots (0-based) from the most attended to the least, by the mean per-token mass
        over every head (ties keep slot order)."""
        mean = self.per_token.mean((0, 1))
        return sorted(range(self.n_documents), key=lambda s: (-float(mean[s]), s))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (layer, head, slot): ``mass`` and ``per_token``."""
        L, H, S = self.mass.shape
        index = pd.MultiIndex.from_product([range(L), range(H), range(S)], names=["layer", "head", "slot"])
        return pd.DataFrame({"mass": self.mass.flatten().numpy(), "per_token": self.per_token.flatten().numpy()},
                            index=index)


def position_profile(model, examples: Sequence[QAExample], *, content_free: bool = True, quiet: bool = False,
                     data: str | None = None) -> PositionProfile:
    """The positional attention profile of ``model`` on ``examples`` (module docstring): one
    forward per example, every head, the answer rows' mass on each document slot. All
    examples must have the same number of documents."""
    if not examples:
        raise DataError("position_profile: no calibration examples.")
    n_docs = {ex.n_documents for ex in examples}
    if len(n_docs) != 1:
        raise DataError(f"position_profile: the examples have {sorted(n_docs)} documents; use one size per profile.")
    (n,) = n_docs
    L, H = model.cfg.n_layers, model.cfg.n_heads
    mass, per_token = torch.zeros(L, H, n), torch.zeros(L, H, n)
    for ex in tqdm(examples, desc="position profile", disable=quiet, leave=False):
        if content_free:
            ex = ex.replace(documents=tuple(content_free_document(d) for d in ex.documents))
        prompt = render(ex, model.tokenizer, max_length=model.cfg.n_ctx)
        rec = Recording(model, "all", {f"doc_{i + 1}": f"doc_{i + 1}" for i in range(n)}, prompt=prompt)
        with torch.no_grad(), model.hooks(fwd_hooks=rec.hooks()):
            model(prompt.input_ids[None].to(model.cfg.device), stop_at_layer=L)
        m = rec.row(0).view(L, H, n)
        lengths = torch.tensor([len(s) for s in prompt.documents], dtype=torch.float32)
        mass += m
        per_token += m / lengths
    meta = {"model": model_id(model), "n_prompts": len(examples), "n_documents": n, "content_free": content_free,
            "data": data}
    return PositionProfile(mass / len(examples), per_token / len(examples), meta)

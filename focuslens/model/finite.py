"""The one check for NaN and inf: a broken model or intervention is refused where it enters,
never turned into a score, a ranking or a direction.

A NaN weight spreads through attention to every later layer and position: head scores come
out NaN (an empty ranking), patching effects NaN, the training cache NaN (directions left at
their random start), and an accuracy of 0.0 looks like a result. So focuslens checks

* the weights, once, when :func:`~focuslens.model.load.load_model` hands out a model
  (:func:`check_weights`, the tensor named);
* every forward pass, on the final residual stream, the input of the last norm
  (:func:`guard`): it depends on every weight and on every intervention of every layer,
  so one check per pass covers scoring, patching, ablation, recording, steering and the
  training cache, whatever hooks ran (``[batch, T, d_model]`` numbers, negligible next to
  the pass);
* the values an entry point derives where a NaN could still enter on its own: logits
  (the unembedding), the training loss and the cached tensors read from disk.

Each uses :func:`require_finite`: one message, of the package's own type
(:class:`~focuslens.errors.NonFiniteError`).
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import Tensor

from focuslens.errors import NonFiniteError

__all__ = ["require_finite", "check_weights", "guard", "BROKEN"]

BROKEN = ("check the model's weights (a damaged checkpoint or an in-place edit) and the "
          "intervention's settings (alpha, tau, directions)")


def require_finite(values: Tensor, what: str, fix: str = BROKEN) -> None:
    """Refuse ``values`` holding NaN or ±inf: a :class:`NonFiniteError` that names ``what``,
    how many values are broken, the index of the first, and ``fix``."""
    values = values.detach()
    if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
        return  # NaN or ±inf anywhere makes the sum non-finite: one reduction, no mask (a sum that
        # merely overflows takes the slow path below and passes it)
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise NonFiniteError(f"{what}: {int(bad.sum())} of {values.numel()} values are NaN or inf (the first at "
                             f"index {first}); {fix}.")


def check_weights(model) -> None:
    """Every parameter and buffer of ``model`` finite (:func:`require_finite` names the first
    broken tensor)."""
    for kind, tensors in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in tensors:
            if t.is_floating_point():  # named as in the checkpoint (without the bridge's wrappers)
                require_finite(t, f"the model's {kind} {name.replace('._original_component', '')}",
                               "the checkpoint is damaged: load it again from its source")


def _checked_final_norm(self, hidden_states: Tensor, *args, **kwargs):
    require_finite(hidden_states, "the final residual stream (the input of the last norm)")
    return self._focuslens_unchecked(hidden_states, *args, **kwargs)


def guard(model) -> None:
    """Check the final residual stream of every forward pass of ``model`` (module
    docstring): its last norm gets an instance forward that checks its input first."""
    norm = getattr(model, "ln_final", None)
    if norm is None or "_focuslens_unchecked" in vars(norm):
        return
    norm._focuslens_unchecked = norm.forward
    object.__setattr__(norm, "forward", MethodType(_checked_final_norm, norm))  # the bridge forwards setattr

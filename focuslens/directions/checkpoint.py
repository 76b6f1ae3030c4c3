"""A training run of focus directions that survives being killed: the trainer's whole state
after each epoch, saved as one unit (:func:`focuslens.io.write_unit`).

At the paper's data size (≈ 1,000 NQ prompts per epoch) an epoch is minutes; a run killed
in epoch 7 should not start again at epoch 1. After every epoch the trainer writes
``state.safetensors`` (every parameter, AdamW's moments and step of each layer group, the
best-so-far directions and validation masses, the shuffling generator's state) and
``state.json`` (the epoch, the history, the settings and the cache it trained on). A resumed
run continues from the last finished epoch with the same shuffles and optimizer state, so it
ends with the same directions as an uninterrupted run (``tests/test_nq.py`` checks it); a
checkpoint of other settings or another cache is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from focuslens.errors import DataError
from focuslens.io import check_unit, has_manifest, json_bytes, write_unit

__all__ = ["TrainerState", "save_state", "load_state", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "focus directions training checkpoint"
_TENSORS, _META = "state.safetensors", "state.json"


class TrainerState(dict):
    """What the trainer needs to continue: ``epoch`` (finished), ``history``,
    ``params`` (per layer group ``(dq, dk)``), ``optimizers`` (their state dicts),
    ``best_q``, ``best_k``, ``best``, ``before``, ``best_epoch``, ``waiting``, ``generator``."""


def _flat(state: TrainerState) -> dict[str, Tensor]:
    tensors = {"generator": state["generator"]}
    for name in ("best_q", "best_k", "best", "before", "best_epoch", "waiting"):
        if state.get(name) is not None:
            tensors[name] = state[name]
    for g, ((dq, dk), opt) in enumerate(zip(state["params"], state["optimizers"])):
        tensors[f"group{g}.dq"], tensors[f"group{g}.dk"] = dq, dk
        for p, moments in opt["state"].items():
            for key, value in moments.items():
                tensors[f"group{g}.opt{p}.{key}"] = torch.as_tensor(value).reshape(-1)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_state(folder: str | Path, state: TrainerState, identity: dict) -> None:
    """Write the state after an epoch (one unit: both files or neither)."""
    groups = [{"param_groups": opt["param_groups"], "moments": {str(p): sorted(m) for p, m in opt["state"].items()}}
              for opt in state["optimizers"]]
    meta = {"epoch": state["epoch"], "history": state["history"], "identity": identity, "groups": groups}
    write_unit(folder, {_TENSORS: save_safetensors(_flat(state)), _META: json_bytes(meta, indent=1)},
               kind=CHECKPOINT_KIND)


def load_state(folder: str | Path, identity: dict) -> TrainerState | None:
    """The saved state, or None when ``folder`` holds none yet. A state saved for another
    identity (settings, model, cache fingerprint) raises a ``DataError`` naming the field."""
    folder = Path(folder)
    if not has_manifest(folder):
        return None
    check_unit(folder, kind=CHECKPOINT_KIND, names=[_TENSORS, _META])
    meta = json.loads((folder / _META).read_text())
    saved = meta["identity"]
    for key in sorted(set(saved) | set(identity)):
        if saved.get(key) != identity.get(key):
            raise DataError(f"{folder}: this training checkpoint has {key}={saved.get(key)!r}, not "
                            f"{identity.get(key)!r}: delete it (or use another folder) to train with these settings.")
    t = load_safetensors((folder / _TENSORS).read_bytes())
    params, optimizers = [], []
    for g, group in enumerate(meta["groups"]):
        params.append((t[f"group{g}.dq"], t[f"group{g}.dk"]))
        state = {}
        for p, keys in group["moments"].items():
            state[int(p)] = {k: (t[f"group{g}.opt{p}.{k}"].reshape(()) if k == "step" else
                                 t[f"group{g}.opt{p}.{k}"].reshape(params[-1][int(p)].shape)) for k in keys}
        optimizers.append({"state": state, "param_groups": group["param_groups"]})
    return TrainerState(epoch=meta["epoch"], history=meta["history"], params=params, optimizers=optimizers,
                        generator=t["generator"], **{k: t.get(k) for k in ("best_q", "best_k", "best", "before",
                                                                         "best_epoch", "waiting")})

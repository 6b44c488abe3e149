"""Third-party weight files (backbones, published checkpoints) read as flat state dicts, safely.

``.safetensors`` is read as is; ``.pth``/``.pt``/``.bin`` only through ``torch.load(weights_only=True)``: a
checkpoint is untrusted input, and unpickling arbitrary objects would run arbitrary code. defectflow's own artifacts
are safetensors only (:mod:`components.artifact`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from components import storage
from components.errors import WeightsError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def unwrap(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """Training checkpoints wrap the weights ({"state_dict": ...}, {"model": ...}) and DDP / torch.compile
    prefix every key; accept those, refuse anything that is not a flat name -> tensor mapping."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}} from some trainers
        if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{uri} holds a {type(obj).__name__}, not a state dict (parameter name -> tensor)",
                           "save the weights with torch.save(model.state_dict(), path) or as .safetensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{uri} is not a state dict: entries {bad[:5]} are not tensors",
                           "save the weights with torch.save(model.state_dict(), path) or as .safetensors")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a weights file (local or S3) as a flat state dict on the CPU.

    ``.pth``/``.pt``/``.bin`` go through ``torch.load(weights_only=True)``: a checkpoint is third-party input, and
    unpickling arbitrary objects would run arbitrary code.
    """
    with storage.local_path(uri) as path:
        if path.lower().endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                obj: Any = load_file(path, device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise WeightsError(f"cannot read {uri} as safetensors: {e}",
                                   "the file is damaged or not a .safetensors file") from e
        elif path.lower().endswith(WEIGHT_SUFFIXES):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise WeightsError(
                    f"cannot read {uri} as a plain state dict: it is damaged, not a PyTorch checkpoint, or it "
                    f"pickles Python objects such as a whole model ({str(e).splitlines()[0][:120]})",
                    "re-save it as torch.save(model.state_dict(), path) or as .safetensors; "
                    "full pickled models are refused because loading them can run arbitrary code") from e
            except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise WeightsError(f"cannot read {uri} with torch.load: {e}",
                                   "the file is damaged or not a PyTorch checkpoint") from e
        else:
            raise WeightsError(f"{uri} has an unknown weights file type",
                               f"use one of {', '.join(WEIGHT_SUFFIXES)}")
    return unwrap(obj, uri)

"""Weight files and weight checks: safetensors on disk, finite and well-formed arrays from the network."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def save_weights(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no pickle is ever loaded)."""
    return load_file(str(path))


def check_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]
) -> str | None:
    """Return why ``arrays`` cannot be aggregated, or ``None`` when they can.

    Args:
        arrays: received arrays by name.
        expected: the shape and dtype of every name the federation sends.

    Returns:
        A reason naming the first bad entry: a missing or unexpected name, a wrong shape or dtype, or a
        non-finite value.
    """
    missing = sorted(expected.keys() - arrays.keys())
    if missing:
        return f"missing arrays {missing[:3]}"
    extra = sorted(arrays.keys() - expected.keys())
    if extra:
        return f"unexpected arrays {extra[:3]}"

    for name, (shape, dtype) in expected.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(shape):
            return f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if np.dtype(value.dtype) != np.dtype(dtype):
            return f"array {name!r} has dtype {value.dtype}, expected {np.dtype(dtype)}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"array {name!r} holds non-finite values (NaN or infinity)"
    return None

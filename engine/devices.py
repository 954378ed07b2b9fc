"""Device selection shared by encoding, indexing and training."""

from __future__ import annotations

import torch


def select_device(requested: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" -> CUDA when present, else CPU; an explicit device must exist."""
    if requested is None or str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    return device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU, where float32 keeps results deterministic."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

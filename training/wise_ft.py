"""`otclip wise-ft`: weight-space ensembling of a fine-tuned model with the model it started from
(WiSE-FT, Wortsman et al. 2022): theta = (1 - alpha) theta_zero_shot + alpha theta_fine_tuned.

Fine-tuning the heads on the seen classes forgets the zero-shot behaviour on unseen ones; the
interpolation keeps part of both, with no retraining. Valid because fine-tuning started from the
zero-shot weights (same architecture, same initialisation)."""

from __future__ import annotations

from pathlib import Path

import torch

from otclip.engine import LoadedModel, load_model, save_checkpoint


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha {alpha}: must be in [0, 1]")


def interpolate_states(start: dict, end: dict, alpha: float, what: str = "the two state dicts") -> dict:
    """(1 - alpha) start + alpha end for floating-point tensors; other tensors come from `end`."""
    _check_alpha(alpha)
    if start.keys() != end.keys() or any(start[k].shape != end[k].shape for k in end):
        raise ValueError(f"{what} have different architectures: "
                         "interpolate a run's checkpoint with the model it was trained from")
    return {k: torch.lerp(start[k].to(v), v, alpha) if v.is_floating_point() else v for k, v in end.items()}


def interpolate(zero_shot: LoadedModel, fine_tuned: LoadedModel, alpha: float) -> LoadedModel:
    """`fine_tuned` with its weights interpolated towards `zero_shot` (modified in place)."""
    merged = interpolate_states(zero_shot.model.state_dict(), fine_tuned.model.state_dict(), alpha,
                                what=f"{fine_tuned.identity.name} and {zero_shot.identity.name}")
    fine_tuned.model.load_state_dict(merged)
    return fine_tuned


def wise_ft(fine_tuned: str | Path, alpha: float, out: str | Path, zero_shot: str | None = None) -> Path:
    """Write the interpolated checkpoint to `out`. The zero-shot model defaults to the one the training run
    started from: its spec as recorded (`start_model`: absolute paths, so from any folder) and checked against the
    recorded checksum (weights changed since would be interpolated as if they were the start); a checkpoint of an
    older run records only its `--model` as given (`train_config.model`)."""
    _check_alpha(alpha)  # before loading two models
    tuned = load_model(str(fine_tuned), device="cpu")  # a clear error for anything but a checkpoint
    start = None
    if zero_shot is None:
        ckpt = torch.load(fine_tuned, map_location="cpu", weights_only=True)
        start = ckpt.get("start_model")
        zero_shot = start["spec"] if start else (
            ckpt.get("train_config") or ckpt.get("train_state", {}).get("config") or {}).get("model")
        if zero_shot is None:
            raise ValueError(f"{fine_tuned}: records no training config; pass --zero-shot MODEL")
    base = load_model(zero_shot, device="cpu")
    if start and base.identity.checksum != start["checksum"]:
        raise ValueError(f"{fine_tuned}: the model it was fine-tuned from, {zero_shot}, has other weights now "
                         f"({base.identity.checksum[:12]}, trained from {start['checksum'][:12]}); pass --zero-shot "
                         "with the model it started from")
    merged = interpolate(base, tuned, alpha)
    name = f"{tuned.identity.name.split('@')[0]}-wise{alpha:g}"
    return save_checkpoint(merged, out, name=name, extra={"wise_ft": {"zero_shot": zero_shot, "fine_tuned": str(fine_tuned),
                                                                      "alpha": alpha}})

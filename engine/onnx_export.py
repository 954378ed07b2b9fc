"""Tracing a tower to ONNX for torch-free queries: one call for the text and the image export."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn


def export_tower(tower: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                 length_axis: bool = False) -> str | None:
    """Trace `tower` (batch size dynamic; with `length_axis`, the input's second axis too) into `path`, its
    weights in a raw file beside it (`path`.data, which ONNX Runtime maps instead of parsing them out of one
    protobuf: a session for ViT-B-32's text tower 0.9 -> 0.33 s here). Returns None, or why the tower
    cannot be exported. A tower whose graph holds the length fixed still runs at the traced length."""
    import onnx

    input_axes = {0: "n", 1: "length"} if length_axis else {0: "n"}

    traced = path.with_name(f"traced-{path.name}")
    try:
        with warnings.catch_warnings(), torch.no_grad(), _no_fused_attention():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's
            torch.onnx.export(tower, (example,), str(traced), input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: input_axes, output_name: {0: "n"}}, dynamo=False)
    except Exception as exc:  # an architecture the exporter cannot trace: those queries keep using torch
        return f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    onnx.save_model(onnx.load(str(traced)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)
    traced.unlink()
    return None


@contextlib.contextmanager
def _no_fused_attention():
    """nn.MultiheadAttention's fused inference kernel (a ViT's image tower takes it) has no ONNX form."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)

"""otclip's core: model loading, encoding, index access, search and retrieval metrics.

Names are imported on first use (PEP 562): a command that loads no model (a search answered through
the exported query model, a no-op re-index, `info`) never pays for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "select_device": "devices",
    "DEFAULT_MODEL_NAME": "model_identity",
    "ModelIdentity": "model_identity",
    "ModelLoadError": "errors",
    "Encoder": "encoding",
    "ImageBatch": "image_batches",
    "IMAGE_EXTENSIONS": "image_paths",
    "ImageDecodeError": "images",
    "load_image": "images",
    "LoadedModel": "model_loading",
    "load_model": "model_loading",
    "save_checkpoint": "model_loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

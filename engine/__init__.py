"""otclip's core: model loading, encoding, index access, search and retrieval metrics."""

from .devices import select_device
from .effnet_minilm import DEFAULT_MODEL_NAME
from .encoding import Encoder, ImageBatch
from .images import IMAGE_EXTENSIONS, ImageDecodeError, load_image
from .model_loading import LoadedModel, ModelIdentity, ModelLoadError, load_model, save_checkpoint

__all__ = [
    "DEFAULT_MODEL_NAME",
    "IMAGE_EXTENSIONS",
    "Encoder",
    "ImageBatch",
    "ImageDecodeError",
    "LoadedModel",
    "ModelIdentity",
    "ModelLoadError",
    "load_image",
    "load_model",
    "save_checkpoint",
    "select_device",
]

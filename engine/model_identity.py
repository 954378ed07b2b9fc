"""What names a model without loading it (torch-free, so that commands which load no model stay fast)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL_NAME = "effnet-minilm"


@dataclass(frozen=True)
class ModelIdentity:
    """What an index records about the model that built it: a readable name and a weights checksum."""

    name: str
    checksum: str

    def same_weights(self, other: ModelIdentity) -> bool:
        return self.checksum == other.checksum

    def __str__(self) -> str:
        return f"{self.name} (weights {self.checksum[:12]})"


def identity_without_loading(spec: str, recorded: dict) -> ModelIdentity | None:
    """The identity of `spec` when it can be had without building the model, else None (load it and ask).

    `recorded` is what an index's manifest says about its model ({"spec", "name", "checksum"}). The default
    model is its packaged files' digest; an otclip checkpoint is its file's sha256 (both memoised on disk).
    An open_clip architecture or pretrained tag named exactly as recorded has the recorded weights: its
    random initialisation is seeded and a tag names fixed weights. A local weights file (ARCH:/path) is
    loaded and hashed, since the file may have changed."""
    from pathlib import Path

    from .checksums import memoised_file_sha256

    if spec == DEFAULT_MODEL_NAME:
        from .effnet_minilm_config import BridgeConfig, packaged_weights_digest

        return ModelIdentity(DEFAULT_MODEL_NAME, packaged_weights_digest(BridgeConfig()))
    if Path(spec).is_file():
        return ModelIdentity(recorded.get("name", spec), memoised_file_sha256(spec))
    weights = spec.partition(":")[2]
    if spec == recorded.get("spec") and not (weights and Path(weights).exists()):
        return ModelIdentity(recorded["name"], recorded["checksum"])
    return None

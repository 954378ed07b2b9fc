"""How training sees a model: frozen feature extractors (run once, cached) and trainable heads.

LiT-style: with the towers locked, only each tower's last projection (`tower_split`) and the logit scale train, so
the frozen parts' outputs are computed once per image/text and cached on disk; each step then costs only the heads
and the losses, for the default model and any open_clip architecture alike. `--unlock-image N` / `--unlock-text N`
unfreeze the towers' last N blocks (open_clip's groups), and where anything before the head then trains, that side's
features are the raw inputs (pixels, uint8 where they can be, and tokens) and its tower runs every step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from otclip.engine import LoadedModel
from otclip.engine.encoding import pixel_finisher

from .tower_split import TowerSplit, image_split, text_split


class TrainableModel(nn.Module):
    def __init__(self, loaded: LoadedModel, unlock_image: int = 0, unlock_text: int = 0) -> None:
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.image_split, self.text_split = image_split(self.model), text_split(self.model)
        self.finish_pixels = pixel_finisher(loaded.preprocess)  # image inputs kept as uint8 (`Encoder.pixels`)
        # open_clip's locks freeze what is locked and leave the rest as it was (a timm tower's), so: all on, then the
        # towers' locks, then off whatever lies outside the towers (a SigLIP logit bias, CoCa's decoder)
        for p in self.model.parameters():
            p.requires_grad = True
        self._lock_image(unlock_image)
        self._lock_text(unlock_text)
        in_towers = self._tower_parameters()
        for p in self.model.parameters():
            p.requires_grad = p.requires_grad and id(p) in in_towers
        for p in (*self.image_split.head_parameters, *self.text_split.head_parameters, self.model.logit_scale):
            p.requires_grad = True
        # a side is cached where nothing before its head trains (`--unlock-image 1` on a ViT opens only its projection)
        self.cache_images = self._frozen_before_head(self.model.visual.parameters(), self.image_split)
        self.cache_texts = self._frozen_before_head(self._text_parameters(), self.text_split)

    def _lock_image(self, groups: int) -> None:
        visual = self.model.visual
        try:
            visual.lock(unlocked_groups=groups, freeze_bn_stats=True)
        except AssertionError as exc:  # open_clip's ModifiedResNet (RN50, ...) locks all or nothing
            raise ValueError(f"--unlock-image {groups}: {type(visual).__name__} towers cannot be partly unlocked "
                             f"({exc}): use 0") from None

    def _lock_text(self, layers: int) -> None:
        text = getattr(self.model, "text", None)
        bert_layers = getattr(getattr(getattr(text, "transformer", None), "encoder", None), "layer", None)
        if bert_layers is None:
            self.model.lock_text_tower(unlocked_layers=layers, freeze_layer_norm=True)
            return
        self.model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
        for layer in bert_layers[len(bert_layers) - layers :]:  # open_clip's HFTextEncoder.lock lacks BERT's names
            for p in layer.parameters():
                p.requires_grad = True

    def _text_parameters(self) -> list[nn.Parameter]:
        """The text tower's parameters (in a CLIP without a `text` module, all but the image tower's and the logit
        scale and bias)."""
        text = getattr(self.model, "text", None)
        if isinstance(text, nn.Module):
            return list(text.parameters())
        return [p for name, p in self.model.named_parameters() if not name.startswith(("visual.", "logit_"))]

    def _tower_parameters(self) -> set[int]:
        """ids of the towers' parameters."""
        return {id(p) for p in (*self.model.visual.parameters(), *self._text_parameters())}

    @staticmethod
    def _frozen_before_head(tower: Iterable[nn.Parameter], split: TowerSplit) -> bool:
        """Whether nothing of the tower but its head trains, so that its features before the head can be cached."""
        head = {id(p) for p in split.head_parameters}
        return not any(p.requires_grad and id(p) not in head for p in tower)

    def feature_key(self, side: str) -> str:
        """Identity of the frozen extractor whose outputs the cache holds (model weights, side, where it is cut)."""
        kind = (self.image_split if side == "images" else self.text_split).kind
        return hashlib.sha256(f"{self.loaded.identity.checksum}:{side}:{kind}:v2".encode()).hexdigest()[:16]

    # --- frozen parts (inputs -> cacheable features) -------------------------------------------
    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_split.features(pixels).float() if self.cache_images else pixels

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_split.features(tokens).float() if self.cache_texts else tokens

    # --- trainable parts (features -> L2-normalised embeddings) ------------------------------
    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.cache_images:
            out = self.image_split.head(features)
        else:
            out = self.model.encode_image(self.finish_pixels(features), normalize=False)
        return F.normalize(out.float(), dim=-1)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        out = self.text_split.head(features) if self.cache_texts else self.model.encode_text(features, normalize=False)
        return F.normalize(out.float(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

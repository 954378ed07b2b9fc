"""How training sees a model: frozen feature extractors (run once, cached) and trainable heads.

LiT-style: with the towers locked, only the heads train, so the frozen towers' outputs are
computed once per image/text and cached on disk; each step then costs only the heads and the
losses. `--unlock-image N` / `--unlock-text N` unfreeze the towers' last N blocks, and then the
features are the raw inputs (pixels, uint8 where they can be, and tokens) and the towers run every step.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from otclip.engine import DEFAULT_MODEL_NAME, LoadedModel
from otclip.engine.encoding import pixel_finisher


class TrainableModel(nn.Module):
    def __init__(self, loaded: LoadedModel, unlock_image: int = 0, unlock_text: int = 0) -> None:
        super().__init__()
        self.loaded = loaded
        self.model = loaded.model
        self.bridge = loaded.recipe.get("kind") == DEFAULT_MODEL_NAME
        self.cache_images = self.bridge and unlock_image == 0
        self.cache_texts = self.bridge and unlock_text == 0
        self.finish_pixels = pixel_finisher(loaded.preprocess)  # image inputs kept as uint8 (`Encoder.pixels`)
        for p in self.model.parameters():
            p.requires_grad = False
        if self.bridge:
            self.model.visual.lock(unlocked_groups=unlock_image, freeze_bn_stats=True)
            for p in (*self.model.visual.proj.parameters(), self.model.visual.class_embeddings,
                      *self.model.text.proj.parameters(), self.model.logit_scale):
                p.requires_grad = True
            if unlock_text:  # open_clip's HFTextEncoder.lock lacks BERT's layer names: unfreeze them here
                for layer in self.model.text.transformer.encoder.layer[-unlock_text:]:
                    for p in layer.parameters():
                        p.requires_grad = True
        else:  # open_clip architectures: unlock the last N groups/layers, always train the projections
            for p in self.model.parameters():
                p.requires_grad = True
            self.model.lock_image_tower(unlocked_groups=unlock_image, freeze_bn_stats=True)
            self.model.lock_text_tower(unlocked_layers=unlock_text, freeze_layer_norm=True)
            for name, p in self.model.named_parameters():
                if name in ("logit_scale", "text_projection", "visual.proj") or name.endswith(".proj.weight"):
                    p.requires_grad = True

    def feature_key(self, side: str) -> str:
        """Identity of the frozen extractor whose outputs the cache holds (model weights + side)."""
        return hashlib.sha256(f"{self.loaded.identity.checksum}:{side}:v1".encode()).hexdigest()[:16]

    # --- frozen parts (inputs -> cacheable features) -------------------------------------------
    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual.trunk(pixels).float() if self.cache_images else pixels

    @torch.no_grad()
    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.cache_texts:
            return tokens
        text = self.model.text
        mask = (tokens != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask).float()

    # --- trainable parts (features -> L2-normalised embeddings) ------------------------------
    def image_head(self, features: torch.Tensor) -> torch.Tensor:
        if self.cache_images:
            out = self.model.visual.head(features)
        else:
            out = self.model.encode_image(self.finish_pixels(features))
        return F.normalize(out.float(), dim=-1)

    def text_head(self, features: torch.Tensor) -> torch.Tensor:
        out = self.model.text.proj(features) if self.cache_texts else self.model.encode_text(features)
        return F.normalize(out.float(), dim=-1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

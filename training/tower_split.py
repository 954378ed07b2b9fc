"""Where training cuts each tower: a frozen part, run once per item and cached, and the trainable head after it.

With the towers locked (LiT: Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"), only each
tower's last projection and the logit scale train, so everything before the projection is a fixed function of the
input: computed once, cached on disk (`FeatureCache`), and each step runs only the heads. The cut is found on the
model's own modules, so that head(features(x)) is the tower's output, `encode_image(x)` / `encode_text(x)`:
- a tower with a trunk and a head (open_clip's `TimmModel`, the default model's `ImageNetBridge`): the trunk's output;
- open_clip's `VisionTransformer` (`visual.proj`), CLIP's and `TextTransformer`'s `text_projection`: the pooled
  features, read from the model's own encode call with the projection taken out for the call;
- a Hugging Face text tower (`HFTextEncoder.proj`): the pooler's output, likewise;
- anything else (a `ModifiedResNet`'s attention pool): the whole output, frozen, with nothing after it to train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TowerSplit:
    kind: str  # what the frozen part outputs (part of the feature cache's key)
    features: Callable[[torch.Tensor], torch.Tensor]  # frozen: inputs -> features
    head: Callable[[torch.Tensor], torch.Tensor]  # trainable: features -> the tower's unnormalised output
    head_parameters: tuple[nn.Parameter, ...]  # what trains when the tower is locked


@contextmanager
def _taken_out(owner: nn.Module, name: str, stand_in: nn.Module | None) -> Iterator[None]:
    """owner.name replaced by `stand_in` (None: a registered parameter or module open_clip skips when it is None)."""
    original = getattr(owner, name)
    setattr(owner, name, stand_in)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _projection_split(kind: str, encode: Callable, owner: nn.Module, name: str, stand_in: nn.Module | None) -> TowerSplit:
    """Features: `encode` with owner.name taken out; head: owner.name (a module, or a matrix multiplied on the right)."""

    def features(inputs: torch.Tensor) -> torch.Tensor:
        with _taken_out(owner, name, stand_in):
            return encode(inputs, normalize=False)

    def head(features: torch.Tensor) -> torch.Tensor:
        projection = getattr(owner, name)
        return projection(features) if isinstance(projection, nn.Module) else features @ projection

    projection = getattr(owner, name)
    parameters = tuple(projection.parameters()) if isinstance(projection, nn.Module) else (projection,)
    return TowerSplit(kind, features, head, parameters)


def _whole(encode: Callable) -> TowerSplit:
    """The tower's output is the feature: nothing after it trains while it is locked."""
    return TowerSplit("output", lambda inputs: encode(inputs, normalize=False), lambda features: features, ())


def image_split(model: nn.Module) -> TowerSplit:
    visual = model.visual
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if isinstance(trunk, nn.Module) and callable(head):  # forward(x) = head(trunk(x))
        in_trunk = {id(p) for p in trunk.parameters()}
        return TowerSplit("trunk", trunk, head, tuple(p for p in visual.parameters() if id(p) not in in_trunk))
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return _projection_split("pre-projection", model.encode_image, visual, "proj", None)
    return _whole(model.encode_image)


def text_split(model: nn.Module) -> TowerSplit:
    text = getattr(model, "text", None)
    if isinstance(getattr(text, "proj", None), nn.Module) and hasattr(text, "pooler"):
        return _projection_split("pooled", model.encode_text, text, "proj", nn.Identity())
    for owner in (text, model):
        if owner is not None and getattr(owner, "text_projection", None) is not None:
            return _projection_split("pre-projection", model.encode_text, owner, "text_projection", None)
    return _whole(model.encode_text)

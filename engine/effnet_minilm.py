"""The offline default model `effnet-minilm`: aligned out of the box through the ImageNet classifier.

An image is embedded as the expected text embedding of its ImageNet class: the EfficientNet-Lite0
classifier's top-k logits (softened by a temperature) weight the MiniLM embeddings of the
1000 class prompts. A text is embedded by MiniLM itself. Both sides end in a linear projection
initialised to the identity, so the model starts aligned and `training/` can fine-tune it like
any CLIP (it is an open_clip `CustomTextCLIP`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic_files import write_npy_atomically
from .batching import length_batches
from .cache_dir import cache_dir
from .checksums import memoised_file_sha256
from .effnet_minilm_config import BridgeConfig, efficientnet_weights_path, minilm_path
from .imagenet_classes import class_prompts, imagenet_class_synonyms

EMBED_DIM = 384
TRUNK_NAME = "tf_efficientnet_lite0"


class ImageNetBridge(nn.Module):
    """Image tower: image -> ImageNet logits -> top-k class distribution -> class-text mixture -> proj.

    Keeping only the top-k logits matters: the full softmax gives every image a long tail over
    1000 classes that drags all embeddings towards the mean class embedding.
    """

    def __init__(self, class_embeddings: torch.Tensor, config: BridgeConfig) -> None:
        super().__init__()
        import timm

        self.config = config
        self.image_size = (config.image_size, config.image_size)
        self.trunk = timm.create_model(TRUNK_NAME, pretrained=False)
        self.class_embeddings = nn.Parameter(class_embeddings.clone())  # (1000, d), L2-normalised rows
        dim = class_embeddings.shape[1]
        self.proj = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(dim))

    def class_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) softmax weights over each image's top-k classes and (n, k) their class indices."""
        logits = self.trunk(images).float() / self.config.temperature
        top = logits.topk(self.config.top_k, dim=-1)
        return top.values.softmax(dim=-1), top.indices

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        """The trainable part: ImageNet logits (n, 1000) -> embedding (n, d). Training caches the logits."""
        top = (logits.float() / self.config.temperature).topk(self.config.top_k, dim=-1)
        weights, indices = top.values.softmax(dim=-1), top.indices
        mixture = torch.einsum("nk,nkd->nd", weights, self.class_embeddings[indices])
        # Every mixture shares the mean class direction; removing it spreads images apart, so that
        # one caption close to that mean does not become every image's nearest text (hubness).
        mean_class = F.normalize(self.class_embeddings.mean(dim=0), dim=0)
        return self.proj(F.normalize(mixture, dim=-1) - self.config.image_centering * mean_class)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
        """Freeze the trunk except its last `unlocked_groups` stages (open_clip's LiT interface)."""
        for p in self.trunk.parameters():
            p.requires_grad = False
        if unlocked_groups:
            groups = [*self.trunk.blocks, nn.ModuleList([self.trunk.conv_head, self.trunk.bn2, self.trunk.classifier])]
            for group in groups[-unlocked_groups:]:
                for p in group.parameters():
                    p.requires_grad = True
        if freeze_bn_stats:
            for m in self.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)


def _build_text_tower(pretrained: bool, context_length: int) -> nn.Module:
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = CLIPTextCfg(
        context_length=context_length,
        hf_model_name=str(minilm_path()),
        hf_tokenizer_name=str(minilm_path()),
        hf_model_pretrained=pretrained,
        hf_proj_type="linear",
        hf_pooler_type="mean_pooler",
    )
    tower = _build_text_tower(EMBED_DIM, cfg)
    with torch.no_grad():
        tower.proj.weight.copy_(torch.eye(EMBED_DIM))
    return tower


def build_tokenizer(config: BridgeConfig):
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(minilm_path()), context_length=config.text_context_length)


def _make_effnet_minilm_class():
    from open_clip.model import CustomTextCLIP

    class EffnetMiniLMCLIP(CustomTextCLIP):
        """open_clip `CustomTextCLIP` whose vision tower is the ImageNet bridge."""

        def __init__(self, text: nn.Module, visual: ImageNetBridge) -> None:
            nn.Module.__init__(self)  # CustomTextCLIP.__init__ would build towers from configs we do not use
            self.output_dict = False
            self.visual = visual
            self.text = text
            self.context_length = text.context_length
            self.vocab_size = text.vocab_size
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
            self.logit_bias = None

    return EffnetMiniLMCLIP


def encode_class_prompts(text_tower: nn.Module, tokenizer) -> torch.Tensor:
    """(1000, d) L2-normalised mean of each class's prompt embeddings (computed on CPU, float32), once per
    machine (`_class_embeddings_cached`): 3,000 prompts, which `embed_by_length` runs at their own length."""
    prompts = [class_prompts(syns) for syns in imagenet_class_synonyms()]
    flat = [p for group in prompts for p in group]
    per_prompt = embed_by_length(text_tower, tokenizer(flat), text_tower.config.pad_token_id,
                                 "default model: class prompts (once)")
    return F.normalize(per_prompt.view(len(prompts), len(prompts[0]), -1).mean(dim=1), dim=-1)


def embed_by_length(text_tower: nn.Module, ids: torch.Tensor, pad_id: int, label: str, batch: int = 256) -> torch.Tensor:
    """L2-normalised embeddings of token rows padded to the context length (trailing `pad_id`), run in batches
    of similar length, each cut to its longest row: MiniLM masks padding (its attention and its mean over
    tokens), so a row's vector is the one of its full padded form up to float rounding (9.5e-8 here), and
    the class prompts (13 tokens of 77 on average) encode 5x faster (38 -> 7 s on 2 cores, paid by every new
    machine's first index or search). A progress bar on a terminal."""
    from tqdm import tqdm

    lengths = (ids != pad_id).sum(dim=1)
    out = torch.empty(len(ids), text_tower.output_dim)
    with torch.no_grad():
        for rows in tqdm(length_batches(lengths.tolist(), batch), desc=label, unit="batch", disable=None, leave=False):
            rows = torch.from_numpy(rows)
            out[rows] = F.normalize(text_tower(ids[rows, : int(lengths[rows].max())]), dim=-1)
    return out


def _class_embeddings_cached(text_tower: nn.Module, tokenizer, weights_digest: str) -> torch.Tensor:
    """The class prompt embeddings, cached on disk: they depend only on MiniLM's weights and the prompts."""
    prompt_digest = hashlib.sha256(
        json.dumps([class_prompts(s) for s in imagenet_class_synonyms()]).encode()
    ).hexdigest()[:12]
    path = cache_dir() / f"imagenet-class-embeddings-{weights_digest[:12]}-{prompt_digest}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    embeddings = encode_class_prompts(text_tower, tokenizer)
    write_npy_atomically(path, embeddings.numpy())
    return embeddings


def build_effnet_minilm(config: BridgeConfig | None = None, pretrained: bool = True) -> nn.Module:
    """Build the default model. `pretrained=False` skips loading weights (a checkpoint supplies them)."""
    config = config or BridgeConfig()
    text = _build_text_tower(pretrained=pretrained, context_length=config.text_context_length)
    if pretrained:
        tokenizer = build_tokenizer(config)
        minilm_digest = memoised_file_sha256(minilm_path() / "model.safetensors")
        class_embeddings = _class_embeddings_cached(text, tokenizer, minilm_digest)
    else:
        class_embeddings = torch.zeros(1000, EMBED_DIM)
    visual = ImageNetBridge(class_embeddings, config)
    if pretrained:
        packaged = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
        trunk_keys = list(visual.trunk.state_dict())
        if len(packaged) != len(trunk_keys):
            raise RuntimeError(
                f"{efficientnet_weights_path()}: {len(packaged)} tensors, {TRUNK_NAME} expects {len(trunk_keys)}"
            )
        # The packaged file uses the original EfficientNet names; the tensors line up with timm's in order.
        visual.trunk.load_state_dict(dict(zip(trunk_keys, packaged.values())))
    return _make_effnet_minilm_class()(text, visual)

"""One loader for every model otclip can use: the offline default, open_clip architectures with a
pretrained tag or a local checkpoint, and otclip checkpoints written by training.

Model specs:
  effnet-minilm                     the offline default (weights shipped in packages)
  ViT-B-32                          an open_clip architecture, random (seeded) weights
  ViT-B-32:laion2b_s34b_b79k        ... with an open_clip pretrained tag (downloads, cached)
  ViT-B-32:/path/to/weights.bin     ... with a local open_clip checkpoint
  /path/to/run/best.pt              an otclip checkpoint (from `save_checkpoint` / training)
"""

from __future__ import annotations

import logging
import os
import socket
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .atomic_files import write_atomically
from .checksums import memoised_file_sha256, state_dict_sha256
from .devices import select_device
from .effnet_minilm import build_effnet_minilm, build_tokenizer
from .effnet_minilm_config import BridgeConfig, packaged_weights_digest
from .errors import ModelLoadError
from .model_identity import DEFAULT_MODEL_NAME, ModelIdentity
from .model_memo import normal_spec, remember_model

CHECKPOINT_FORMAT = "otclip-checkpoint"
CHECKPOINT_VERSION = 1
RANDOM_INIT_SEED = 0

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@contextmanager
def _hub_offline():
    """The default model reads its weights from package folders: make sure nothing asks the hub."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a "Loading weights" bar on every start is noise
    except ImportError:
        pass
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@contextmanager
def _quiet_logging():
    """open_clip logs a multi-line error before raising; the user gets our one line instead."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@dataclass
class LoadedModel:
    """A CLIP-like model with everything needed to embed images and texts."""

    model: nn.Module  # has encode_image(images) and encode_text(tokens)
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]  # PIL RGB image -> (3, H, W) tensor
    identity: ModelIdentity
    embed_dim: int
    recipe: dict = field(default_factory=dict)  # how to rebuild the architecture from a checkpoint
    spec: str | None = None  # what `load_model` was given: reloads these weights (None: built in memory)

    @property
    def image_size(self) -> int | None:
        """The input side the image preprocessing resizes to (lets JPEG decoding skip detail)."""
        size = getattr(self.model.visual, "image_size", None)
        return int(min(size)) if isinstance(size, (tuple, list)) else (int(size) if size else None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _bridge_preprocess(config: BridgeConfig):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(config.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(config.image_size),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's tf_efficientnet_lite0 normalisation
        ]
    )


def _effnet_minilm(config: BridgeConfig, state_dict: dict | None, identity: ModelIdentity) -> LoadedModel:
    with _hub_offline():
        model = build_effnet_minilm(config, pretrained=state_dict is None)
        tokenizer = build_tokenizer(config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=_bridge_preprocess(config),
        identity=identity,
        embed_dim=model.visual.proj.out_features,
        recipe={"kind": DEFAULT_MODEL_NAME, "bridge": asdict(config)},
    )


def _open_clip(arch: str, pretrained: str | None, state_dict: dict | None, name: str) -> LoadedModel:
    import open_clip

    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"{name}: unknown model; use '{DEFAULT_MODEL_NAME}', an open_clip architecture "
            f"(e.g. ViT-B-32, see open_clip.list_models()), ARCH:PRETRAINED_TAG, ARCH:/local/weights, "
            "or an otclip checkpoint path"
        )
    torch.manual_seed(RANDOM_INIT_SEED)  # random-weight architectures get the same weights every load
    remote = bool(pretrained) and not Path(pretrained).exists()
    if remote and _names_a_file(pretrained):
        raise ModelLoadError(f"{name}: no such file {pretrained} (local weights, looked for from {Path.cwd()})")
    try:
        with _quiet_logging():
            if remote:
                model, preprocess = _create_from_hub_or_cache(open_clip, arch, pretrained)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except Exception as exc:  # hub errors come in many types; the user needs one line, not a traceback
        if remote:
            raise ModelLoadError(
                f"{name}: could not fetch pretrained weights '{pretrained}' for {arch} "
                f"({type(exc).__name__}; no network?). Download them where there is network and pass "
                f"the local file instead: {arch}:/path/to/open_clip_model.safetensors"
            ) from None
        raise ModelLoadError(f"{name}: could not load {arch} weights from {pretrained}: {exc}") from None
    if state_dict is not None:
        model.load_state_dict(state_dict)
    checksum = state_dict_sha256(model)
    return LoadedModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch),
        preprocess=preprocess,
        identity=ModelIdentity(name, checksum),
        embed_dim=int(open_clip.get_model_config(arch)["embed_dim"]),
        recipe={"kind": "open_clip", "arch": arch},
    )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect to the hub, instead of huggingface_hub's minute of retries per file."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _cached_hub_file(open_clip, arch: str, tag: str) -> str | None:
    """Path of already-downloaded weights for ARCH:TAG in the Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    repo = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename) if repo else None
        if isinstance(found, str):
            return found
    return None


def _create_from_hub_or_cache(open_clip, arch: str, tag: str):
    """Weights from the hub cache when there; else download, but only after one quick reachability
    check (huggingface_hub would otherwise retry for about a minute per file without network)."""
    source = _cached_hub_file(open_clip, arch, tag)
    if source is None and not _hub_reachable():
        raise ConnectionError("hub unreachable")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source or tag)
    return model, preprocess


def _probe_dim(model: nn.Module, open_clip, arch: str) -> int:
    with torch.no_grad():
        return int(model.encode_text(open_clip.get_tokenizer(arch)(["x"])).shape[-1])


def _from_checkpoint(path: Path) -> LoadedModel:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own message runs to paragraphs: its first line, or what the file is not
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" if str(exc).strip() else repr(exc)
        if not zipfile.is_zipfile(path):  # what torch.save writes
            reason = "not a file torch.save wrote"
        raise ModelLoadError(f"{path}: cannot read as a checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(
            f"{path}: not an otclip checkpoint; for open_clip weights pass ARCH:{path} (e.g. ViT-B-32:{path})"
        )
    recipe = ckpt["recipe"]
    identity = ModelIdentity(f"{ckpt.get('name', recipe['kind'])}@{path.name}", memoised_file_sha256(path))
    if recipe["kind"] == DEFAULT_MODEL_NAME:
        loaded = _effnet_minilm(BridgeConfig(**recipe["bridge"]), ckpt["state_dict"], identity)
    elif recipe["kind"] == "open_clip":
        loaded = _open_clip(recipe["arch"], None, ckpt["state_dict"], identity.name)
        loaded.identity = identity
    else:
        raise ModelLoadError(f"{path}: unknown model kind {recipe['kind']!r} in checkpoint")
    return loaded


WEIGHTS_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def _names_a_file(text: str) -> bool:
    """A checkpoint or weights path rather than a model's or a pretrained tag's name (which hold no slash)."""
    return "/" in text or os.sep in text or Path(text).suffix in WEIGHTS_SUFFIXES


def load_model(spec: str = DEFAULT_MODEL_NAME, device: str | torch.device | None = None) -> LoadedModel:
    """Load a model from a spec (see module docstring) in eval mode on `device` (auto by default)."""
    spec = str(spec)
    if spec == DEFAULT_MODEL_NAME:
        config = BridgeConfig()
        loaded = _effnet_minilm(config, None, ModelIdentity(DEFAULT_MODEL_NAME, packaged_weights_digest(config)))
    elif Path(spec).is_file():
        loaded = _from_checkpoint(Path(spec))
    elif spec.startswith("hf-hub:"):
        loaded = _open_clip_hub(spec)
    elif ":" not in spec and _names_a_file(spec):
        raise ModelLoadError(f"{spec}: no such file (a checkpoint's path, looked for from {Path.cwd()})")
    else:
        arch, _, pretrained = spec.partition(":")
        loaded = _open_clip(arch, pretrained or None, None, spec)
    loaded.spec = normal_spec(spec)  # a checkpoint from any cwd
    loaded.model.to(select_device(device)).eval()
    remember_model(loaded.spec, loaded.identity, loaded.embed_dim)  # a later index may then skip loading it
    return loaded


def _open_clip_hub(spec: str) -> LoadedModel:
    import open_clip

    try:
        with _quiet_logging():
            model, _, preprocess = open_clip.create_model_and_transforms(spec)
    except Exception as exc:
        raise ModelLoadError(
            f"{spec}: could not fetch the model from the Hugging Face hub ({type(exc).__name__}; no network?). "
            "Download it where there is network and pass ARCH:/path/to/weights instead"
        ) from None
    return LoadedModel(model, open_clip.get_tokenizer(spec), preprocess,
                       ModelIdentity(spec, state_dict_sha256(model)), _probe_dim(model, open_clip, spec),
                       {"kind": "open_clip", "arch": spec})


def save_checkpoint(loaded: LoadedModel, path: str | Path, name: str | None = None, extra: dict | None = None) -> Path:
    """Write `loaded`'s weights as an otclip checkpoint (atomically) that `load_model(path)` accepts."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "name": name or loaded.identity.name.split("@")[0],
        "recipe": loaded.recipe,
        "state_dict": {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()},
        **(extra or {}),
    }
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))  # a full disk leaves no half file

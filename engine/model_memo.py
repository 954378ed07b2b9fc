"""What a model spec loaded as on this machine, remembered so that a new index of a model seen before is
created without building it: with the model's exported image tower cached (`query_model_cache`), indexing
then runs through ONNX Runtime and never imports torch (#14).

A memo holds the spec's identity and embedding width. It is used only while the packages that build
models are at the versions that wrote it (a seeded random initialisation is theirs) and, for a spec naming
a local weights file, while that file keeps its size and mtime. A hub name is trusted to keep its weights,
as open_clip's download cache trusts it; if they changed, the torch model later refuses the index by its
checksum rather than mixing vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic_files import write_json_atomically
from .cache_dir import cache_dir
from .model_identity import ModelIdentity, identity_without_loading

BUILDERS = ("torch", "open_clip_torch", "torchvision")


def normal_spec(spec: str, base: Path | None = None) -> str:
    """A checkpoint path or the weights path of ARCH:/local/weights made absolute (what `load_model` and indexes
    record, so that an index loads its model from any folder); any other spec as given. `base`: a folder where a
    relative path is looked for when the current folder has no such file (an index recorded relative paths before
    2026-12: its parent folder is where `--out` was most often given from; the weights' checksum is checked after
    they load either way)."""
    if spec.startswith("hf-hub:"):
        return spec
    arch, colon, weights = spec.partition(":")
    for prefix, path in (("", spec), (arch + colon, weights)) if colon else (("", spec),):
        for folder in (Path.cwd(), base) if base is not None else (Path.cwd(),):
            if path and (found := Path(folder, path)).is_file():  # an absolute path ignores the folder
                return prefix + str(found.resolve())
    return spec


def _fingerprint(spec: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in BUILDERS:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    weights = next((Path(p).resolve() for p in (spec, spec.partition(":")[2]) if p and Path(p).is_file()), None)
    stat = weights.stat() if weights is not None else None
    return {"spec": spec, "versions": versions,
            "weights": [str(weights), stat.st_size, stat.st_mtime_ns] if stat is not None else None}


def _memo_path(spec: str) -> Path:
    return cache_dir() / "models" / f"{hashlib.sha256(spec.encode()).hexdigest()[:32]}.json"


def remember_model(spec: str, identity: ModelIdentity, embed_dim: int) -> None:
    """Note what `spec` loaded as (a cache that cannot be written only costs a model load later)."""
    spec = normal_spec(spec)
    try:
        write_json_atomically(_memo_path(spec), {**_fingerprint(spec), "name": identity.name,
                                                 "checksum": identity.checksum, "embed_dim": embed_dim})
    except OSError:
        pass


def remembered_model(spec: str) -> tuple[ModelIdentity, int] | None:
    """(identity, embedding width) that `spec` loaded as, while still valid (see above); else None."""
    spec = normal_spec(spec)
    try:
        memo = json.loads(_memo_path(spec).read_text())
        if {key: memo.get(key) for key in ("spec", "versions", "weights")} != _fingerprint(spec):
            return None
        known = identity_without_loading(spec, {})  # the default model: its packaged files' digest now
        if known is not None and known.checksum != memo["checksum"]:
            return None
        return ModelIdentity(memo["name"], memo["checksum"]), int(memo["embed_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

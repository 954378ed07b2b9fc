"""Export a model's text tower for torch-free text queries (`text_query_model`), checked before it is kept.

The export is kept only when, on probe texts that cover case, punctuation, accents, emoji, HTML
entities and truncation, (1) the shipped tokenizer gives exactly the model's own token ids and (2)
ONNX Runtime's embeddings match the torch model's within `TOLERANCE` (max absolute difference of
L2-normalised vectors). Otherwise nothing is written and text queries load the torch model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model_loading import LoadedModel
from .onnx_export import export_tower
from .text_query_model import QueryTokenizer, TextQueryModel

TOLERANCE = 1e-4
PROBES = [
    "a cat", "A CAT!!", "galaxies   in\tdeep space", "l'été à Paris — café crème", "🙂 an emoji", "IT'S THE 90'S",
    "&amp; html &lt;b&gt; entities", "Ünïcödé ÅÄÖ ß straße", "日本語のテキスト", "co-operate e-mail 3.14 1234567",
    "a photo of a dog on the grass " * 12, "x" * 300, " ",
]
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # open_clip SimpleTokenizer's pattern


class _NormalisedText(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids).float(), dim=-1)


def _tokenizer_json(tokenizer) -> tuple[str, str] | str:
    """(tokenizer.json text, cleaner name) for open_clip's tokenizers, or the reason there is none."""
    from open_clip import tokenizer as oc

    cleaners = {oc._clean_whitespace: "whitespace", oc._clean_lower: "lower"}
    clean = cleaners.get(getattr(tokenizer, "clean_fn", None))
    if clean is None:
        return f"tokenizer cleaning {getattr(tokenizer, 'clean_fn', None)!r} has no torch-free equivalent"
    if isinstance(tokenizer, oc.HFTokenizer):
        backend = getattr(tokenizer.tokenizer, "backend_tokenizer", None)
        if backend is None or tokenizer.tokenizer_mode or tokenizer.strip_sep_token:
            return "not a plain fast Hugging Face tokenizer"
        return backend.to_str(), clean
    if isinstance(tokenizer, oc.SimpleTokenizer):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
        bpe = Tokenizer(models.BPE(vocab=dict(tokenizer.encoder), merges=merges, end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # GPT-2's byte -> unicode map
        ])
        return bpe.to_str(), clean
    return f"{type(tokenizer).__name__} has no torch-free equivalent"


def _special_ids(loaded: LoadedModel) -> dict:
    """bos, eos and pad read off the model's own tokenisation of an empty text: [bos, eos, pad, ...]."""
    ids = loaded.tokenizer([""])[0].tolist()
    return {"bos": ids[0], "eos": ids[1], "pad": ids[2], "context_length": len(ids)}


def _tokenizer_files(loaded: LoadedModel) -> tuple[str, dict] | str:
    """(tokenizer.json text, its settings) for this model, or why there is none."""
    spec = _tokenizer_json(loaded.tokenizer)
    if isinstance(spec, str):
        return spec
    tokenizer_json, clean = spec
    return tokenizer_json, {**_special_ids(loaded), "clean": clean, "model_checksum": loaded.identity.checksum}


def query_tokenizer(loaded: LoadedModel) -> tuple[QueryTokenizer, dict] | str:
    """(the torch-free tokenizer, its settings) for this model, or why there is none. Not yet checked
    against the model's own: `export_text_query_model` does that."""
    found = _tokenizer_files(loaded)
    return found if isinstance(found, str) else (QueryTokenizer(*found), found[1])


def export_text_query_model(loaded: LoadedModel, directory) -> str | None:
    """Write the checked export into `directory` (an IndexDirectory); returns None, or why it was not kept."""
    found = _tokenizer_files(loaded)
    if isinstance(found, str):
        return found
    tokenizer_json, info = found
    device = loaded.device
    tower = _NormalisedText(loaded.model).to("cpu").eval()
    try:
        return _export_and_check(loaded, tower, tokenizer_json, info, directory)
    finally:
        loaded.model.to(device)


def _export_and_check(loaded: LoadedModel, tower: nn.Module, tokenizer_json: str, info: dict, directory) -> str | None:
    with tempfile.TemporaryDirectory(prefix="otclip-text-export-") as tmp:
        onnx_path, tokenizer_path = Path(tmp) / "text.onnx", Path(tmp) / "tokenizer.json"
        tokenizer_path.write_text(tokenizer_json, encoding="utf-8")
        failed = export_tower(tower, loaded.tokenizer(PROBES[:2]), onnx_path, "input_ids", "embedding",
                              length_axis=True)
        if failed:
            return failed
        exported = TextQueryModel(onnx_path, tokenizer_path, info, threads=1)
        expected_ids = loaded.tokenizer(PROBES).numpy()
        if not np.array_equal(exported.tokenize(PROBES), expected_ids):
            return "the torch-free tokenizer disagrees with the model's on the probe texts"
        with torch.no_grad():
            expected = tower(torch.from_numpy(expected_ids)).numpy()
        error = float(np.abs(exported.encode_texts(PROBES) - expected).max())
        if not error <= TOLERANCE:
            return f"ONNX embeddings differ from torch's by {error:.2e} (> {TOLERANCE:.0e})"
        trim = _trimmed_error(exported, expected) <= TOLERANCE
        directory.publish_query_model("text", {"text.onnx.data": onnx_path.with_name(onnx_path.name + ".data"),
                                               "text.onnx": onnx_path, "tokenizer.json": tokenizer_path},
                                      {**info, "max_abs_error": error, "trim": trim})
    return None


def _trimmed_error(exported: TextQueryModel, expected: np.ndarray) -> float:
    """The largest difference from the torch model's vectors (of ids padded to the context length) when each
    probe is run alone and in small batches of mixed lengths, padded only to their longest; inf where the
    graph holds the length fixed (open_clip's own text transformer adds all L positional embeddings). Runs
    the checked export's own session, its tokenizer switched to trimming (a second session would load the
    weights again)."""
    groups = [[i] for i in range(len(PROBES))] + [list(range(i, min(i + 3, len(PROBES)))) for i in range(0, len(PROBES), 3)]
    exported.tokenize.trim = True
    try:
        return max(float(np.abs(exported.encode_texts([PROBES[i] for i in g]) - expected[g]).max()) for g in groups)
    except Exception:  # ONNX Runtime: a shape the graph does not take
        return float("inf")

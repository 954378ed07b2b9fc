"""Text queries without torch: an exported text tower run by ONNX Runtime, with a `tokenizers` tokenizer.

What a terminal search pays is mostly imports and model loading (torch 2.6 s, open_clip 4.5 s, the
model 1.8 s against a 50 ms forward, #14). The index keeps an ONNX export of its model's text tower
(`text_query_export` writes it at index time, after checking it against the torch model), so
`otclip search` answers a text query with numpy, ONNX Runtime, FAISS and SQLite alone. Nothing here
imports torch.

Token ids are [bos] + body[: L - 2] + [eos], padded with `pad` to the context length L: both
open_clip's SimpleTokenizer and its Hugging Face tokenizers (with truncation) produce that layout;
the export only ships a tokenizer whose ids it has compared with the model's own on probe texts.
Where the export was checked to give the same vectors without the padding (`trim` in its settings: a
text tower that masks padding, such as the default model's MiniLM), a batch is padded only to its
longest text: "a cat" is 4 tokens of 77, and its forward 1.7 ms instead of 15 here. A batch of a
corpus then holds texts of similar length (ordered by characters), so that it pads little.
"""

from __future__ import annotations

import html
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .batching import length_batches
from .onnx_sessions import cpu_session


def whitespace_clean(text: str) -> str:
    """open_clip's "whitespace" cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def lower_clean(text: str) -> str:
    """open_clip's "lower" cleaning (its SimpleTokenizer's default): the above, lower-cased."""
    return whitespace_clean(text).lower()


CLEANERS = {"whitespace": whitespace_clean, "lower": lower_clean}


class QueryTokenizer:
    """(n, L) int64 token ids from a `tokenizers` tokenizer.json and the layout described above."""

    def __init__(self, tokenizer_json: str, info: dict) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()  # a saved Hugging Face tokenizer may carry the padding of its last call;
        self.tokenizer.no_truncation()  # the layout is built here
        self.clean = CLEANERS[info["clean"]]
        import ftfy  # noqa: F401 (every cleaning uses it: imported here, not at the first query)

        self.bos, self.eos, self.pad = info["bos"], info["eos"], info["pad"]
        self.context_length = info["context_length"]
        self.trim = bool(info.get("trim", False))  # exports made before trimming existed pad to L

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(n, L) ids, or (n, the longest text's length) where the export is trimmed."""
        bodies = self.tokenizer.encode_batch([self.clean(t) for t in texts], add_special_tokens=False)
        rows = [[self.bos, *body.ids[: self.context_length - 2], self.eos] for body in bodies]
        width = max(map(len, rows), default=2) if self.trim else self.context_length
        out = np.full((len(texts), width), self.pad, dtype=np.int64)
        for row, ids in zip(out, rows):
            row[: len(ids)] = ids
        return out


class TextQueryModel:
    """`encode_texts` like the torch Encoder's: (n, d) float32 L2-normalised embeddings."""

    def __init__(self, onnx_path: str | Path, tokenizer_path: str | Path, info: dict, threads: int | None = None,
                 few_queries: bool = False) -> None:
        """`few_queries`: a process that answers one query and exits (see `onnx_sessions.cpu_session`)."""
        with ThreadPoolExecutor(1) as pool:  # the tokenizer (and ftfy) load while ONNX Runtime maps the weights
            tokenizer = pool.submit(QueryTokenizer, Path(tokenizer_path).read_text(encoding="utf-8"), info)
            self.session = cpu_session(onnx_path, threads, few_queries)
            self.tokenize = tokenizer.result()
        self.input_name = self.session.get_inputs()[0].name

    def encode_texts(self, texts, batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        """All `texts` in one forward pass, or `batch_size` at a time (a caption corpus being indexed, with a
        progress bar as the torch Encoder shows one: by default past 8 batches)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), np.float32)
        size = batch_size or len(texts)
        by_length = self.tokenize.trim and size < len(texts)  # a corpus: batches of similar length
        batches = length_batches([len(t) for t in texts] if by_length else [0] * len(texts), size)
        if progress or (progress is None and len(batches) > 8):
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode texts", unit="batch")
        parts = [(rows, self.session.run(None, {self.input_name: self.tokenize([texts[i] for i in rows])})[0])
                 for rows in batches]
        out = np.empty((len(texts), parts[0][1].shape[1]), np.float32)
        for rows, part in parts:
            out[rows] = part
        return out

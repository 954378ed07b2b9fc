"""ImageNet-1k class names, read from timm's bundled synset files (no network needed)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
)


@lru_cache(maxsize=1)
def imagenet_class_synonyms() -> list[list[str]]:
    """The 1000 ImageNet classes in logit order, each as its list of WordNet synonyms."""
    info = resources.files("timm.data") / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines() if line
    )
    if len(synsets) != 1000:
        raise RuntimeError(f"timm's imagenet_synsets.txt lists {len(synsets)} classes, expected 1000")
    return [[name.strip() for name in lemmas[s].split(",")] for s in synsets]


def class_prompts(synonyms: list[str]) -> list[str]:
    """Prompts for one class. All synonyms go into each prompt: a lone lemma is often ambiguous
    ("crane" the bird vs the machine), the list of synonyms pins the sense down."""
    name = synonyms[0] if len(synonyms) == 1 else f"{synonyms[0]} ({', '.join(synonyms[1:])})"
    return [template.format(name) for template in PROMPT_TEMPLATES]

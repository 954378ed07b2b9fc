"""Turning class names into captions and prompts."""

from __future__ import annotations


def with_article(name: str) -> str:
    """'an ankle boot', 'a sneaker': prompts read as natural sentences, which text encoders prefer."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def class_prompt(name: str, template: str = "a photo of {}.") -> str:
    return template.format(with_article(name))

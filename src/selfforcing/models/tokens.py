"""Prompt words: tokenisation shared by the text encoder and vocabulary building."""

from __future__ import annotations

import re


def tokenize(prompt: str) -> list[str]:
    """Lower-case words; commas, semicolons and full stops are dropped, hyphenated words stay whole."""
    return re.sub(r"[,.;]", " ", prompt.lower()).split()


def prompt_vocabulary(prompts: list[str]) -> list[str]:
    """The sorted set of words used by ``prompts``."""
    return sorted({w for p in prompts for w in tokenize(p)})

"""The closed vocabulary of the synthetic shapes world.

Every caption, GenEval prompt, DPG description and DPG question the world writes uses only these words
(tests assert it), so the tiny presets' word-level tokenizer never sees an unknown word. Add words here, at
the end of ``WORDS``, when a template needs them: token ids are list positions, so appending keeps old ids.
"""

from __future__ import annotations

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

WORDS: tuple[str, ...] = (
    # articles, glue
    "a", "an", "the", "of", "and", "with", "is", "are", "on", "in", "at", "to", "there", "it", "its", "one",
    "photo", "image", "picture", "shows", "show", "contains", "scene", "object", "objects", "shape", "shapes",
    "gray", "grey", "background", "plain", "total", "exactly", "no", "other", "nothing", "else",
    # numbers
    "two", "three", "four", "1", "2", "3", "4",
    # classes (singular, plural)
    "circle", "circles", "square", "squares", "triangle", "triangles",
    # palette
    "red", "green", "blue", "yellow", "purple", "orange", "black", "white",
    # relations and places
    "left", "right", "above", "below", "top", "bottom", "middle", "center", "centre", "side", "part", "corner",
    "near", "next", "upper", "lower",
    # sizes
    "small", "large", "big", "medium", "sized",
    # VERIFI-style instructions / questions
    "describe", "detail", "draw", "make", "generate", "create", "render", "please", "answer", "yes", "question",
    "does", "do", "have", "has", "colored", "color", "colour", "relation", "count", "number",
    # punctuation (the tokenizer splits it off words)
    ".", ",", ":", "?", "'",
)

ALL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + WORDS

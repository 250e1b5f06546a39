"""The built-in set's vocabulary: the shapes and colours its captions name, the held-out pairs, and how its judges
read them. Everything that knows the built-in set's words lives here; evaluation code is handed a `Vocabulary`.

    BUILTIN.label_sets()        {"shape" | "colour" | "combo": (class names, phrases naming each class)}
    BUILTIN.truth(meta)         what a sample's metadata says it shows: {"shape", "colour", "combo"}
    BUILTIN.is_heldout(meta)    whether its (shape, colour) pair was kept out of training
    BUILTIN.prompts()           "a red circle", "an orange star", ... every pair, held-out ones included
    BUILTIN.wanted(prompt)      the (shape, colour) a prompt asks for
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {  # name -> RGB, far apart from each other and from every background
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 10),
}
# (shape, colour) pairs never seen in training: each shape and colour still appears with the five other partners.
HELDOUT = (("triangle", "blue"), ("star", "orange"), ("cross", "green"))


def with_article(phrase: str) -> str:
    """"red circle" -> "a red circle", "orange star" -> "an orange star"."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def named(text: str, names) -> str | None:
    """The one word of `names` that `text` contains as a whole word, or None (none or several)."""
    found = [n for n in names if re.search(rf"\b{n}\b", text.lower())]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Vocabulary:
    """Shapes and colours a dataset's captions name, and the (shape, colour) pairs held out of training."""

    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    heldout: frozenset[tuple[str, str]] = frozenset()

    def label_sets(self) -> dict[str, tuple[list[str], list[list[str]]]]:
        """Zero-shot label sets -> (class names, phrases per class). Captions always name the colour with the shape,
        so a shape's (colour's) phrases are it with every colour (shape): "red circle", "green circle", ..."""
        shapes, colours = list(self.shapes), list(self.colours)
        combos = [f"{c} {s}" for s in shapes for c in colours]
        return {"shape": (shapes, [[f"{c} {s}" for c in colours] for s in shapes]),
                "colour": (colours, [[f"{c} {s}" for s in shapes] for c in colours]),
                "combo": (combos, [[x] for x in combos])}

    def truth(self, meta: dict) -> dict[str, str | None]:
        """What a sample shows, from its metadata (audio metadata names the shape `word`); None where unknown."""
        shape, colour = meta.get("shape") or meta.get("word"), meta.get("colour")
        return {"shape": shape, "colour": colour, "combo": f"{colour} {shape}" if shape and colour else None}

    def is_heldout(self, meta: dict) -> bool:
        """A sample whose (shape, colour) pair never occurs in training."""
        t = self.truth(meta)
        return (t["shape"], t["colour"]) in self.heldout

    def prompts(self) -> list[str]:
        """Every colour with every shape, held-out pairs included: "a red circle", "an orange star", ..."""
        return [with_article(f"{c} {s}") for s in self.shapes for c in self.colours]

    def wanted(self, prompt: str) -> tuple[str | None, str | None]:
        """The (shape, colour) a prompt names (None where it names none or several)."""
        return named(prompt, self.shapes), named(prompt, self.colours)


BUILTIN = Vocabulary(SHAPES, tuple(COLOURS), frozenset(HELDOUT))

r"""Erasure prompts: the concept words put into templates, guide and preserve sets, and the test
bed's prompt forms, retain set and keyword phrases. The one home of prompt construction; the
vocabulary and the a/an rule are ``jaxsafe.data.shapes``'s.

A config's ``concepts`` holds ``erase`` (the concept words), ``guide`` (what they map to; ``""``
= unconditional; one for all or one per erased word), ``preserve`` (words to keep) and
``templates`` (prompt forms with ``{}``). On the test bed ``templates = ("{testbed}",)`` stands
for the captions' own forms ("a {}", "a {} circle", …, "a {} square on a plain background"): the
text encoder is causal, so "a red" reproduces exactly the token states of every caption naming
red, while the single word "red" does not (docs/erasure.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxsafe.data import shapes

TESTBED_TEMPLATES = "{testbed}"  # templates = the test bed's caption forms
SAME_ATTRIBUTE = "{same_attribute}"  # preserve = the other values of the erased attribute


def fix_articles(text: str) -> str:
    """Single spaces, and "a"/"an" agreeing with the next word ("a orange" -> "an orange")."""
    words = text.split()
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = shapes.article(words[i + 1])
    return " ".join(words)


def with_article(phrase: str) -> str:
    """``"a red circle"`` / ``"an orange"``: the phrase after its article."""
    return f"{shapes.article(phrase)} {phrase}"


def testbed_templates(attribute: int) -> list[str]:
    """The test bed's caption forms with ``{}`` in the slot of ``attribute`` (0 shape, 1 colour,
    2 background), the other attributes enumerated: "a {}", "a {} circle", ..., "a red circle on
    a {} background". Edits then see the token states the evaluation captions produce (the text
    encoder is causal: "a red" is the prefix of every caption naming red, while the word "red"
    alone gives other states)."""
    slot = ["{}" if a == attribute else None for a in range(3)]
    forms = set()
    for s_ in (None, *shapes.SHAPES):
        for c in (None, *shapes.COLOURS):
            for b in (None, *shapes.BACKGROUNDS):
                shape, colour, bg = (slot[0] or s_, slot[1] or c, slot[2] or b)
                if (
                    shape is None
                    or (attribute == 0 and s_ is not None)
                    or (attribute == 1 and c is not None)
                    or (attribute == 2 and b is not None)
                ):
                    continue
                words = ["a"] + ([colour] if colour else []) + [shape]
                forms.add(" ".join(words + ([f"on a {bg} background"] if bg else [])))
    if attribute == 1:
        forms.add("a {}")  # the prefix of every caption naming the colour
    return sorted(forms)


def _concept(word: str, why: str) -> tuple[int, int]:
    """``shapes.CONCEPTS[word]``; a ValueError saying ``why`` a test-bed word was needed."""
    if word not in shapes.CONCEPTS:
        raise ValueError(
            f"{why} need test-bed concept words; got {word!r}, which is not one of "
            f"the test bed's concepts ({', '.join(shapes.CONCEPTS)})"
        )
    return shapes.CONCEPTS[word]


def _forms(templates: Sequence[str], word: str) -> list[str]:
    if list(templates) != [TESTBED_TEMPLATES]:
        return list(templates)
    return testbed_templates(_concept(word, f"templates {TESTBED_TEMPLATES!r}")[0])


def expand(templates: Sequence[str], words: Sequence[str], like: str | None = None) -> list[str]:
    """Prompts ``template.format(word)`` for every word (outer) and template (inner); no
    templates means the words themselves. ``templates = ("{testbed}",)`` stands for the test
    bed's caption forms of the word's attribute (of ``like``'s, for a guide word)."""
    if not templates:
        return list(words)
    return [fix_articles(t.format(w)) for w in words for t in _forms(templates, like or w)]


def preserve_words(concepts) -> list[str]:
    """``concepts.preserve`` with ``"{same_attribute}"`` replaced by the other values of the
    erased concepts' attributes (test bed: erasing red preserves orange, green and blue)."""
    out = []
    for w in concepts.preserve:
        if w != SAME_ATTRIBUTE:
            out.append(w)
            continue
        erased = {_concept(e, f"preserve {SAME_ATTRIBUTE!r}") for e in concepts.erase}
        for a in sorted({a for a, _ in erased}):
            out += [v for i, v in enumerate(shapes.ATTRIBUTES[a][1]) if (a, i) not in erased]
    return out


def prompt_pairs(concepts) -> list[tuple[str, str]]:
    """(erase prompt, guide prompt) pairs of a config's ``concepts``: each erased word with its
    guide (``guide``: one for all, or one per erased word) in every template."""
    erase, g = list(concepts.erase), concepts.guide
    g = [g] if isinstance(g, str) else list(g)
    guides = g * len(erase) if len(g) == 1 else g
    if len(guides) != len(erase):
        raise ValueError(
            f"concepts.guide: one guide or one per erased concept ({len(erase)}), got {len(guides)}"
        )
    tpl = list(concepts.templates)
    return [
        (a, b)
        for w, gw in zip(erase, guides)
        for a, b in zip(expand(tpl, [w]), expand(tpl, [gw], like=w))
    ]


def testbed_retain(erase: Sequence[str]) -> list[str]:
    """The test bed's retain set for targets ``erase``: every short caption "a [colour] <shape>
    [on a <background> background]" (synonyms included) that names no target (nor a synonym of
    one); near concepts (orange after red) stay in, as the retain set is there to keep them."""
    erased = {shapes.CONCEPTS[w] for w in erase if w in shapes.CONCEPTS}
    out = []
    for colour in (None, *shapes.COLOURS):
        for shape in shapes.SHAPES + tuple(shapes.SYNONYMS):
            for bg in (None, *shapes.BACKGROUNDS):
                words = [w for w in (colour, shape) if w]
                if any(shapes.CONCEPTS[w] in erased for w in [*words, bg] if w):
                    continue
                text = with_article(" ".join(words))
                out.append(text + (f" on a {bg} background" if bg else ""))
    return out


def testbed_keywords(concepts: Sequence[str]) -> list[str]:
    """Keyword phrases of test-bed concepts (and their synonyms): the word, the word with its
    article, and the word in every short phrase of the other attribute ("a red circle", …)."""
    words = list(concepts) + [w for w, c in shapes.SYNONYMS.items() if c in concepts]
    out = []
    for w in dict.fromkeys(words):
        kind = shapes.ATTRIBUTES[_concept(w, "the test bed's keyword phrases")[0]][0]
        if kind == "shape":
            out += [w, with_article(w)] + [with_article(f"{c} {w}") for c in shapes.COLOURS]
        elif kind == "colour":
            out += [w, with_article(w)] + [with_article(f"{w} {s}") for s in shapes.SHAPES]
        else:
            out += [w, f"a {w} background", f"on a {w} background"]
    return out


def read_prompt_csv(path: str, column: str = "prompt") -> list[str]:
    """The ``column`` of a prompt CSV (the authors' ``data/prompts/*.csv`` layout)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise ValueError(f"{path}: expected a CSV with a {column!r} column")
    return [r[column] for r in rows]


def read_prompt_lines(path: str) -> list[str]:
    """The non-empty lines of a text file, stripped (one prompt per line)."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]

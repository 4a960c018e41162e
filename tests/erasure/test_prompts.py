"""Prompt templates and (erase, guide) pairs of the erasure configs."""

import ml_collections
import pytest

from jaxsafe.erasure import prompts


def test_articles_agree_with_the_next_word():
    assert prompts.fix_articles("a  orange circle on a plain background") == (
        "an orange circle on a plain background"
    )
    assert prompts.fix_articles("an red") == "a red"
    assert prompts.fix_articles("a ellipse") == "an ellipse"


def test_expand_and_pairs_follow_the_templates():
    tpl = ("a {}", "a {} circle")
    assert prompts.expand(tpl, ["red", "orange"]) == [
        "a red",
        "a red circle",
        "an orange",
        "an orange circle",
    ]
    assert prompts.expand((), ["red"]) == ["red"]
    c = ml_collections.ConfigDict(dict(erase=("red", "blue"), guide=("",), templates=tpl))
    assert prompts.prompt_pairs(c) == [
        ("a red", "a"),
        ("a red circle", "a circle"),
        ("a blue", "a"),
        ("a blue circle", "a circle"),
    ]
    c.guide = ("green", "orange")
    assert prompts.prompt_pairs(c)[3] == ("a blue circle", "an orange circle")
    c.guide = ("green", "orange", "blue")
    with pytest.raises(ValueError, match="one guide or one per erased concept \\(2\\), got 3"):
        prompts.prompt_pairs(c)


def test_testbed_templates_follow_the_concept_attribute():
    from jaxsafe.data import shapes

    tok = shapes.tokenizer()
    c = ml_collections.ConfigDict(
        dict(
            erase=("red",),
            guide=("",),
            templates=("{testbed}",),
            preserve=("{same_attribute}", "a box"),
        )
    )
    pairs = prompts.prompt_pairs(c)
    assert ("a red", "a") in pairs and (
        "a red circle on a plain background",
        "a circle on a plain background",
    ) in pairs
    assert len(pairs) == 1 + 4 + 4 * 3
    assert prompts.preserve_words(c) == ["orange", "green", "blue", "a box"]
    c.erase = ("square",)
    pairs = prompts.prompt_pairs(c)
    assert ("an orange square on a dotted background", "an orange on a dotted background") in pairs
    assert all("square" in a for a, _ in pairs) and len(pairs) == 1 + 4 + 3 + 4 * 3
    assert prompts.preserve_words(c)[:3] == ["circle", "ellipse", "triangle"]
    for w in shapes.CONCEPTS:  # every form is a valid test-bed prompt
        tok(prompts.expand(("{testbed}",), [w]))
    with pytest.raises(ValueError, match="need test-bed concept words; got 'dog'"):
        prompts.expand(("{testbed}",), ["dog"])

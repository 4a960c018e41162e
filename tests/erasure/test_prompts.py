"""Prompt templates and (erase, guide) pairs of the erasure configs."""

import ml_collections
import pytest

from configs.erasure import common
from experiments import _erasure


def test_articles_agree_with_the_next_word():
    assert _erasure.fix_articles("a  orange circle on a plain background") == (
        "an orange circle on a plain background")
    assert _erasure.fix_articles("an red") == "a red"
    assert _erasure.fix_articles("a ellipse") == "an ellipse"


def test_expand_and_pairs_follow_the_templates():
    tpl = ("a {}", "a {} circle")
    assert _erasure.expand(tpl, ["red", "orange"]) == ["a red", "a red circle", "an orange",
                                                        "an orange circle"]
    assert _erasure.expand((), ["red"]) == ["red"]
    c = ml_collections.ConfigDict(dict(erase=("red", "blue"), guide=("",), templates=tpl))
    assert _erasure.prompt_pairs(c) == [("a red", "a"), ("a red circle", "a circle"),
                                        ("a blue", "a"), ("a blue circle", "a circle")]
    c.guide = ("green", "orange")
    assert _erasure.prompt_pairs(c)[3] == ("a blue circle", "an orange circle")
    c.guide = ("green", "orange", "blue")
    with pytest.raises(ValueError, match="one guide or one per erased concept \\(2\\), got 3"):
        _erasure.prompt_pairs(c)


def test_testbed_templates_are_in_the_vocabulary():
    from jaxsafe.data import shapes

    tok = shapes.tokenizer()
    prompts = _erasure.expand(common.testbed_templates(), list(shapes.COLOURS) + [""])
    tok(prompts)  # raises on an unknown word or a prompt too long
    assert common.same_attribute("red") == ("orange", "green", "blue")
    assert common.same_attribute("box") == ("circle", "ellipse", "triangle")

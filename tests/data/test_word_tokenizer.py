"""The test bed's word tokenizer: CLIP framing, id layout, EOT pooling, errors, save/load."""

import json

import numpy as np
import pytest

from jaxsafe.data import shapes
from jaxsafe.data.word_tokenizer import WordTokenizer

WORDS = ["a", "red", "circle", "on", "striped", "background"]


def test_ids_follow_clip_layout():
    tok = WordTokenizer(WORDS, max_length=8)
    # PAD = 0, words 1..6 in the given order, SOT = 7, EOT = 8 (the largest, as in CLIP).
    np.testing.assert_array_equal(tok("a red circle"), [7, 1, 2, 3, 8, 0, 0, 0])
    np.testing.assert_array_equal(tok(""), [7, 8, 0, 0, 0, 0, 0, 0])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (0, 7, 8, 9)


def test_round_trip_and_padding_on_dataset_captions():
    tok = shapes.tokenizer()
    captions = [shapes.example(0, i)["caption"] for i in range(200)]
    ids = tok(captions)
    assert ids.shape == (200, 12) and ids.dtype == np.int32
    for text, row in zip(captions, ids):
        assert tok.decode(row) == text
        n = len(text.split())
        assert row[0] == tok.bos_token_id and row[n + 1] == tok.eos_token_id
        assert np.all(row[n + 2 :] == tok.pad_token_id) and np.all(row[1 : n + 1] > 0)


def test_eot_pooling_rules_agree():
    """HF CLIPTextModel pools at argmax(ids) (eos_token_id == 2) or at the first EOT: same here."""
    tok = shapes.tokenizer()
    ids = tok(["", "a box", "an orange ellipse on a dotted background", "a red circle"])
    first_eot = np.array([list(r).index(tok.eos_token_id) for r in ids])
    np.testing.assert_array_equal(np.argmax(ids, -1), first_eot)
    np.testing.assert_array_equal(first_eot, [1, 3, 8, 4])


def test_case_and_spaces_are_normalised():
    tok = WordTokenizer(WORDS)
    np.testing.assert_array_equal(tok("  A  Red\tcircle "), tok("a red circle"))


def test_unknown_word_is_named():
    tok = shapes.tokenizer()
    with pytest.raises(ValueError, match=r"unknown word 'dog' in 'a red dog'"):
        tok("a red dog")
    with pytest.raises(ValueError, match=r"unknown word '<\|endoftext\|>'"):
        tok("a <|endoftext|>")


def test_too_long_prompt_raises():
    tok = WordTokenizer(WORDS, max_length=5)
    tok("a red circle")  # 3 words + SOT + EOT = 5 fit
    with pytest.raises(ValueError, match=r"has 4 words; at most max_length - 2 = 3 fit"):
        tok("a red circle on")


def test_bad_vocabularies_raise():
    with pytest.raises(ValueError, match=r"duplicates: \['a'\]"):
        WordTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match=r"lower-case words"):
        WordTokenizer(["Red"])
    with pytest.raises(ValueError, match=r"max_length must be >= 2"):
        WordTokenizer(["a"], max_length=1)


def test_decode_rejects_unframed_ids():
    tok = WordTokenizer(WORDS, max_length=8)
    with pytest.raises(ValueError, match=r"must start with SOT=7 and contain EOT=8"):
        tok.decode([1, 2, 8])


def test_save_load_round_trip(tmp_path):
    tok = shapes.tokenizer(max_length=10)
    tok.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab["<|startoftext|>"] == len(shapes.VOCABULARY) + 1 and vocab["<|pad|>"] == 0
    back = WordTokenizer.load(str(tmp_path))
    assert back.vocab == tok.vocab and back.max_length == 10
    vocab["red"], vocab["orange"] = vocab["orange"], vocab["red"] + 100
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"ids must be PAD=0, words 1..16, SOT=17, EOT=18"):
        WordTokenizer.load(str(tmp_path))


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab.json' not found"):
        WordTokenizer.load(str(tmp_path / "nothing"))

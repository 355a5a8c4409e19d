"""Character tokenizer: one id per character, specials fixed, save/load round trip to identical ids."""

import pytest
from transformers import PreTrainedTokenizerFast

from dash.tokenizer import ARITH_ALPHABET, EOS_TOKEN, SPECIAL_TOKENS, build_arith_tokenizer, build_char_tokenizer

TEXTS = ["12+34*56=", "0", "9900<eos>", "07+42*13=553<eos>", "<pad><bos>1<eos>", ""]


def test_vocabulary_is_specials_then_alphabet():
    tok = build_arith_tokenizer()
    # the task uses a 16-symbol vocabulary: 13 characters + pad/bos/eos.
    assert len(tok) == 16
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == [*SPECIAL_TOKENS, *ARITH_ALPHABET]


def test_one_id_per_character_and_no_added_specials():
    tok = build_arith_tokenizer()
    ids = tok("12+34*56=")["input_ids"]
    assert ids == [len(SPECIAL_TOKENS) + ARITH_ALPHABET.index(c) for c in "12+34*56="]
    # Written special tokens are single ids, not 5 characters.
    assert tok("42" + EOS_TOKEN)["input_ids"] == [*tok("42")["input_ids"], tok.eos_token_id]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(text):
    tok = build_arith_tokenizer()
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # no spaces inserted between characters
    assert tok.decode(ids, skip_special_tokens=True) == "".join(
        c for c in text.replace("<pad>", "").replace("<bos>", "").replace("<eos>", "")
    )


def test_unknown_character_raises():
    tok = build_arith_tokenizer()
    for bad in ["1 2", "1-2", "x", "1\n2"]:
        # tokenizers raises a bare Exception naming the missing unknown token.
        with pytest.raises(Exception, match="UNK"):
            tok(bad)


def test_save_and_reload_give_identical_ids(tmp_path):
    tok = build_arith_tokenizer()
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert len(again) == len(tok)
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(tok(text)["input_ids"]) == text
    assert again.model_max_length == tok.model_max_length


def test_custom_alphabet_and_bad_alphabets():
    tok = build_char_tokenizer("ab-")
    assert len(tok) == len(SPECIAL_TOKENS) + 3
    assert tok.decode(tok("a-b<eos>")["input_ids"]) == "a-b<eos>"
    for bad in ["", "aa", 5]:
        with pytest.raises(ValueError):
            build_char_tokenizer(bad)

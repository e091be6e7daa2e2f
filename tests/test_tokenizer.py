"""The release's SentencePiece tokenizer matches SPEC.md section 4."""
import hashlib

import pytest
import sentencepiece as spm

from lowmem.tokenizer import BUNDLED

# The copy shipped in the package must be the release's file, byte for byte.
TOKENIZER = BUNDLED
SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"
EXAMPLE = "The answer to life the universe and everything is of course"
EXAMPLE_IDS = [422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805]


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER))


def test_file_is_the_release_model():
    assert hashlib.sha256(TOKENIZER.read_bytes()).hexdigest() == SHA256


def test_spec_example(sp):
    assert sp.encode(EXAMPLE) == EXAMPLE_IDS
    assert sp.decode(EXAMPLE_IDS) == EXAMPLE


def test_vocab_and_special_ids(sp):
    assert sp.get_piece_size() == 131072
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]


@pytest.mark.parametrize("text", [
    "Hello, world! 12345",
    "  leading spaces and\ttabs\nnewlines",
    "Grüße, 日本語, emoji \U0001F600 and rare \u2603 bytes",
])
def test_decode_round_trip(sp, text):
    ids = sp.encode(text)
    assert all(0 <= i < 131072 for i in ids)
    assert sp.decode(ids) == text


def test_digits_are_split(sp):
    pieces = sp.encode("2024", out_type=str)
    assert [p.lstrip("\u2581") for p in pieces if p.lstrip("\u2581")] == ["2", "0", "2", "4"]


def test_text_that_is_not_unicode_is_a_clear_error():
    from lowmem.tokenizer import Tokenizer, TokenizerError
    with pytest.raises(TokenizerError, match="not valid UTF-8 text"):
        Tokenizer(TOKENIZER).encode("abc\udcff")
    assert Tokenizer(TOKENIZER).encode("abc") == spm.SentencePieceProcessor(
        model_file=str(TOKENIZER)).encode("abc")

import pytest

from moebuild.model.tokenizer import ByteTokenizer


def test_bytes_and_image_placeholder_round_trip():
    tokenizer = ByteTokenizer(512, image_token_id=511)
    ids = tokenizer.encode("a<image>é")
    assert ids == [ord("a") + 3, 511, 0xC3 + 3, 0xA9 + 3]
    assert tokenizer.decode(ids) == "a<image>é"


def test_small_vocab_is_refused():
    with pytest.raises(ValueError, match="vocabulary of at least 259"):
        ByteTokenizer(100)

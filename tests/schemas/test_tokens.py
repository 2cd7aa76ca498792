"""The image placeholder id: never a special token's id, never an id the byte tokenizer gives text;
nor are pad, bos and eos with the byte tokenizer."""

import copy
from importlib.resources import files

import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from moebuild.model import tokenizer
from moebuild.schemas import CrossFieldError, ModelSpec
from moebuild.schemas.spec import BYTE_TOKENIZER_IDS

LLAVA = YAML(typ="safe").load(files("moebuild.zoo").joinpath("moe_llava", "micro-moe-llava.yaml").read_text())
BYTES = "a byte id of the built-in byte tokenizer (tokenizer: null gives byte b the id b + 3, so text takes ids 3..258)"


def problems(tokens=None, language=None):
    data = copy.deepcopy(LLAVA)
    data["tokens"] = tokens or {}
    data["language"] |= language or {}
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate(data)
    (error,) = info.value.errors()
    assert isinstance(error["ctx"]["error"], CrossFieldError)
    return error["ctx"]["error"].problems


def test_the_byte_range_is_the_one_the_byte_tokenizer_refuses():
    """schemas/ cannot import the tokenizer (builder code), so the range is written twice."""
    assert BYTE_TOKENIZER_IDS == range(tokenizer.SPECIALS, tokenizer.SPECIALS + tokenizer.BYTES)
    for image in (2, 3, 258, 259):
        if image in BYTE_TOKENIZER_IDS:
            with pytest.raises(ValueError, match="is a byte id of the byte-level tokenizer"):
                tokenizer.ByteTokenizer(512, image)
        else:
            tokenizer.ByteTokenizer(512, image)


@pytest.mark.parametrize("tokens, special", [
    ({"image": 0}, "pad"), ({"image": 1}, "bos"), ({"image": 2}, "eos"), ({"image": 511, "eos": 511}, "eos"),
    ({"image": 300, "pad": 300}, "pad"),
])
def test_image_id_is_not_a_special_tokens(tokens, special):
    assert problems(tokens) == [
        (("tokens", "image"),
         f"{tokens['image']} is also tokens.{special}; the image placeholder needs an id of its own")]


def test_a_defaulted_image_id_is_not_a_special_tokens_either():
    assert problems({"eos": 511}) == [
        (("language", "vocab_size"), "with tokens.image null the image placeholder is vocab_size - 1 = 511, which is "
                                     "also tokens.eos; the image placeholder needs an id of its own")]


@pytest.mark.parametrize("image", [3, 5, 258])
def test_image_id_is_not_a_byte_id_of_the_byte_tokenizer(image):
    assert problems({"image": image}) == [
        (("tokens", "image"), f"{image} is {BYTES}; set tokens.image outside that range (e.g. 511)")]


def test_a_vocabulary_without_room_past_the_bytes_says_so():
    assert problems({"image": 100}, language={"vocab_size": 128}) == [
        (("tokens", "image"), f"100 is {BYTES}; raise language.vocab_size past 259 and set tokens.image there, "
                              "or name a tokenizer directory (tokenizer: ...)")]
    assert problems(language={"vocab_size": 259}) == [
        (("language", "vocab_size"), f"with tokens.image null the image placeholder is vocab_size - 1 = 258, which "
                                     f"is {BYTES}; raise language.vocab_size past 259, or name a tokenizer directory "
                                     "(tokenizer: ...)")]


@pytest.mark.parametrize("change", [
    {"tokens": {"image": 259}},  # just past the bytes
    {"tokens": {"image": 5}, "tokenizer": "tok"},  # another tokenizer's ids are not known here
    {"language": LLAVA["language"] | {"vocab_size": 128}},  # too small for the byte tokenizer: its default id is 127
    {"language": LLAVA["language"] | {"vocab_size": 260}},  # default 259
])
def test_image_ids_that_collide_with_nothing(change):
    ModelSpec.model_validate(copy.deepcopy(LLAVA) | change)


@pytest.mark.parametrize("name, value", [("pad", 3), ("bos", 100), ("eos", 258)])
def test_special_ids_are_not_byte_ids_of_the_byte_tokenizer(name, value):
    assert problems({name: value}) == [
        (("tokens", name), f"{value} is {BYTES}; give tokens.{name} an id below 3 or 259..511, or name a tokenizer "
                           "directory (tokenizer: ...)")]


@pytest.mark.parametrize("change", [
    {"tokens": {"pad": 2}},  # pad == eos, as real models have it
    {"tokens": {"eos": 259}},  # just past the bytes
    {"tokens": {"eos": 5}, "tokenizer": "tok"},  # another tokenizer's ids are not known here
    {"tokens": {"pad": 3, "bos": 5, "eos": 7}, "language": LLAVA["language"] | {"vocab_size": 128}},  # no byte tokenizer
])
def test_special_ids_that_collide_with_nothing(change):
    ModelSpec.model_validate(copy.deepcopy(LLAVA) | change)

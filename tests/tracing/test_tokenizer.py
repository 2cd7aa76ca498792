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


def word_tokenizer_dir(tmp_path):
    """A local transformers tokenizer (word level, 8 words): what a spec's `tokenizer:` names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "what", "is", "this", "?", "a", "cat", "dog"]
    backend = Tokenizer(models.WordLevel({w: i + 10 for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_trace_tokenizes_with_the_specs_tokenizer(tmp_path):
    """The ids trace feeds the model are the spec tokenizer's (as training's), not the byte-level ones,
    with the spec's bos first, `<image>` expanded to the picture's tokens, and the spec's pad id."""
    from PIL import Image

    from moebuild import build
    from moebuild.spec.loading import load_spec
    from moebuild.tracing.inputs import Sample, batches

    spec = load_spec("micro-moe-llava", [f"tokenizer={word_tokenizer_dir(tmp_path)}", "tokens.bos=4", "tokens.pad=5"])
    model = build(spec, device="meta")
    image = Image.new("RGB", (32, 32))
    (batch, images), = batches([Sample("<image> what is this ?", image), Sample("a cat")], model, batch_size=2)
    n = model.num_image_tokens
    assert batch["input_ids"][0].tolist() == [4] + [spec.image_token_id] * n + [11, 12, 13, 14]
    assert batch["input_ids"][1].tolist() == [4, 15, 16] + [5] * (n + 2)
    assert batch["attention_mask"][1].tolist() == [1] * 3 + [0] * (n + 2)
    assert len(images) == 1


def test_trace_without_bos_and_text_that_encodes_to_the_image_id(tmp_path):
    from moebuild import build
    from moebuild.spec.loading import load_spec
    from moebuild.tracing.inputs import InputError, Sample, batches

    directory = word_tokenizer_dir(tmp_path)
    spec = load_spec("micro-moe-llava", [f"tokenizer={directory}", "tokens.bos=null"])
    (batch, _), = batches([Sample("a cat")], build(spec, device="meta"), batch_size=1)
    assert batch["input_ids"].tolist() == [[15, 16]]
    clash = build(load_spec("micro-moe-llava", [f"tokenizer={directory}", "tokens.image=12"]), device="meta")
    with pytest.raises(InputError, match="encodes to the image token id 12"):
        list(batches([Sample("what is this")], clash, batch_size=1))

"""`moebuild train` and the training API: LLaVA records to masked labels, the three stages in order,
exact resume, checkpoints that load, clear refusals; and the model under a user's own Trainer and
PEFT LoRA. The long learning run is marked slow."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import moebuild
from moebuild.cli import main
from moebuild.model.tokenizer import ByteTokenizer
from moebuild.train import DataError, Settings, TrainError, train
from moebuild.train.data import IGNORE, Encoder, collate
from moebuild.train.synthetic import COLOURS, make_colour_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_colour_task(tmp_path_factory.mktemp("colours"), per_colour=2)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def test_byte_tokenizer_round_trips_and_refuses_what_collides():
    tokenizer = ByteTokenizer(512, image_token_id=511)
    ids = tokenizer.encode("rouge ünd 🟥")
    assert min(ids) >= 3 and max(ids) <= 258 and tokenizer.decode(ids) == "rouge ünd 🟥"
    assert tokenizer.encode("A") == [ord("A") + 3]
    with pytest.raises(ValueError, match="at least 259 ids"):
        ByteTokenizer(128)
    with pytest.raises(ValueError, match="image token id 100 is a byte id"):
        ByteTokenizer(512, image_token_id=100)


def test_a_record_trains_on_the_answers_only():
    spec = moebuild.load_spec("micro-moe-llava")
    tokenizer = ByteTokenizer(512, spec.image_token_id)

    class Processor:  # four image tokens per picture
        def __call__(self, images):
            from moebuild.model.processing import ProcessedImages

            return ProcessedImages(torch.zeros(len(images), 3, 8, 8), [4] * len(images))

    encoder = Encoder(tokenizer, Processor(), spec.image_token_id, max_length=256)
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                {"from": "human", "value": "and?"}, {"from": "gpt", "value": "ok"}]}
    example = encoder.encode(record, "r", None)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert trained == tokenizer.encode("yo") + [2] + tokenizer.encode("ok") + [2]
    prompt = tokenizer.decode(example.input_ids[: example.input_ids.index(tokenizer.encode("y")[0])])
    assert prompt == "USER: hi\nASSISTANT: "
    assert example.input_ids[0] == 1 and example.labels[0] == IGNORE  # bos


def test_records_that_do_not_fit_are_named(tmp_path, task):
    bad = [{"image": "images/red-0.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                            {"from": "gpt", "value": "red"}]}]
    (tmp_path / "images").symlink_to(task.parent / "images")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    model = moebuild.build("micro-moe-llava")
    with pytest.raises(DataError, match=r"bad.json: record 0: 0 <image> placeholders for 1 image"):
        train(model, tmp_path / "bad.json", tmp_path / "run", Settings(stage="align", steps=1))
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"record 0: image .*nope.png"):
        train(model, tmp_path / "bad.json", tmp_path / "run", Settings(stage="align", steps=1))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        train(model, tmp_path / "bad.json", tmp_path / "run", Settings(stage="align", steps=1))


def test_collate_pads_right_and_ignores_padding():
    from moebuild.train.data import Example

    batch = collate([Example([1, 5, 6], [IGNORE, 5, 6], None), Example([1, 7], [IGNORE, 7], None)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]


def test_stages_run_in_order_resume_exactly_and_checkpoints_load(tmp_path, task):
    settings = dict(batch_size=3, lr=3e-3, log_every=1)
    align = train("micro-moe-llava", task, tmp_path / "align", Settings(stage="align", steps=1, **settings))
    start = tmp_path / "align" / "checkpoint-000001"
    frozen = {n: p.clone() for n, p in align.model.named_parameters() if not n.startswith("connector.")}
    loaded = moebuild.MoEVLMForConditionalGeneration.from_pretrained(start)
    assert all(torch.equal(p, loaded.state_dict()[n]) for n, p in align.model.state_dict().items())
    assert all(torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in frozen.items())  # align trains the connector only

    whole = train(start, task, tmp_path / "whole", Settings(stage="instruct", steps=4, save_every=2, **settings))
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    train(start, task, tmp_path / "split", Settings(stage="instruct", steps=2, **settings))
    resumed = train(start, task, tmp_path / "split", Settings(stage="instruct", steps=4, save_every=2, **settings),
                    resume=True)
    assert resumed.step == 4 and losses(tmp_path / "split") == losses(tmp_path / "whole")  # the same curve, exactly
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    # each checkpoint's routing.json: the routing of the steps since the one before (here 3 and 4),
    # as the log's per-step loads (the model's own statistics) add up; a resumed run's is the same
    routing = json.loads((tmp_path / "whole" / "checkpoint-000004" / "routing.json").read_text())
    logged = [r["load"]["0"]["all->experts"]["all"] for r in map(json.loads, (tmp_path / "whole" / "log.jsonl")
                                                                     .read_text().splitlines()) if r["step"] > 2]
    assert routing["batches"] == 2 and len(logged) == 2
    assert routing["layers"][0]["routes"]["all->experts"]["all"]["load"] == [sum(c) for c in zip(*logged)]
    assert routing == json.loads((tmp_path / "split" / "checkpoint-000004" / "routing.json").read_text())

    moe = train(tmp_path / "whole" / "checkpoint-000004", task, tmp_path / "moe", Settings(stage="moe", steps=1, **settings))
    counts = moe.model.apply_stage("moe")
    assert counts.trainable["moe"] > 0 and counts.trainable["connector"] == 0 and counts.frozen["vision"] > 0
    record = json.loads((tmp_path / "moe" / "log.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lm_loss", "switch_aux", "load"} <= record.keys()
    load = record["load"]["0"]["all->experts"]
    assert sum(load["text"]) + sum(load["image"]) == sum(load["all"]) > 0


def test_the_cli_refuses_what_it_cannot_continue(tmp_path, task):
    args = ["train", "micro-moe-llava", "--data", task, "--stage", "align", "--batch-size", 2, "--log-every", 1]
    first = run(*args, "-o", tmp_path / "r", "--steps", 1)
    assert first.exit_code == 0, first.output
    assert "connector  trainable" in first.output and "wrote" in first.output
    again = run(*args, "-o", tmp_path / "r", "--steps", 2)
    assert again.exit_code == 1 and "--resume continues it" in again.output
    assert again.output.strip().splitlines() == [f"Error: {tmp_path / 'r'} exists and is not empty (--resume continues it)"]
    changed = run(*args, "-o", tmp_path / "r", "--steps", 2, "--resume", "--lr", 0.5)
    assert changed.exit_code == 1 and "started with lr=0.001" in changed.output
    unknown = run("train", "micro-moe-llava", "--data", task, "--stage", "algn", "-o", tmp_path / "u")
    assert unknown.exit_code == 1
    assert "no training stage 'algn'; the spec has align, instruct, moe; did you mean 'align'?" in unknown.output
    assert not (tmp_path / "u").exists()
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        train("micro-moe-llava", task, tmp_path / "empty", Settings(stage="align", steps=1), resume=True)


def test_stage_counts_cover_every_parameter():
    model = moebuild.build("micro-moe-llava")
    counts = model.apply_stage("moe")
    total = {part: counts.trainable[part] + counts.frozen[part] for part in counts.trainable}
    assert sum(total.values()) == sum(p.numel() for p in model.parameters())
    assert total["vision"] == sum(p.numel() for p in model.vision.parameters())
    assert counts.trainable == model.trainable_for_stage("moe")


def test_a_users_own_trainer_trains_the_model(tmp_path, task):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from moebuild.model.tokenizer import load_tokenizer
    from moebuild.registry import build_processor
    from moebuild.train.data import encode_file

    model = moebuild.build("micro-moe-llava", seed=0)
    examples = encode_file(task, Encoder(load_tokenizer(model.spec), build_processor(model.spec),
                                         model.spec.image_token_id, 256))
    before = model.connector.layers[0].weight.clone()
    args = TrainingArguments(tmp_path / "hf", max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             dataloader_num_workers=0, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=examples,
                     data_collator=lambda batch: collate(batch, pad_token_id=0)).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.connector.layers[0].weight)


def test_peft_lora_on_attention_and_stacked_experts_matches_its_merged_weights():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = moebuild.build("micro-moe-llava", seed=0).eval()
    ids = torch.randint(3, 300, (2, 9))

    def logits(m):  # the same Gumbel draw in every call: deepspeed_top2 samples its second choice at eval too
        torch.manual_seed(5)
        return m(input_ids=ids).logits

    with torch.no_grad():
        base = logits(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=["pools.experts.gate_up_proj", "pools.experts.down_proj"])
    lora = get_peft_model(model, config)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any("self_attn.q_proj.lora_B" in n for n in names) and any("pools.experts" in n and "lora_B" in n for n in names)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # LoRA starts at zero; move it so that it counts
        adapted = logits(lora)
        merged = logits(lora.merge_and_unload())
    assert (adapted - base).abs().max() > 1e-3  # the experts' and attention's adapters change the output
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_colour_task_is_learned(tmp_path):
    """Three stages on micro-moe-llava: the instruct stage takes the loss from ~5.6 to under 0.1."""
    data = make_colour_task(tmp_path / "data", per_colour=4)
    settings = dict(batch_size=8, lr=3e-3, log_every=10)
    train("micro-moe-llava", data, tmp_path / "align", Settings(stage="align", steps=20, **settings))
    first = losses(tmp_path / "align")[10]
    instruct = train(tmp_path / "align" / "checkpoint-000020", data, tmp_path / "instruct",
                     Settings(stage="instruct", steps=150, **settings))
    train(tmp_path / "instruct" / "checkpoint-000150", data, tmp_path / "moe", Settings(stage="moe", steps=20, **settings))
    last = losses(tmp_path / "moe")[20]
    assert first > 4.0 and last < 0.1, (first, last)
    model = moebuild.MoEVLMForConditionalGeneration.from_pretrained(tmp_path / "moe" / "checkpoint-000020").eval()
    from moebuild.model.tokenizer import load_tokenizer
    from moebuild.registry import build_processor

    tokenizer, processor = load_tokenizer(model.spec), build_processor(model.spec)
    encoder = Encoder(tokenizer, processor, model.spec.image_token_id, 256)
    right = 0
    for name in COLOURS:
        record = {"image": f"images/{name}-1.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is this?"}]}
        example = encoder.encode(record, "q", data.parent)
        ids = torch.tensor([example.input_ids])
        out = model.generate(input_ids=ids, pixel_values=example.pixel_values, max_new_tokens=8, do_sample=False)
        right += tokenizer.decode(out[0, ids.shape[1]:].tolist()) == name
    assert right >= 5, right
    assert instruct.step == 150


def test_a_spec_without_eos_is_refused_before_training(tmp_path, task):
    model = moebuild.build(moebuild.load_spec("micro-moe-llava", ["tokens.eos=null", "~training"]))
    with pytest.raises(TrainError, match="tokens.eos is null"):
        train(model, task, tmp_path / "run", Settings(stage=None, steps=1))
    spec = tmp_path / "no-eos.yaml"
    spec.write_text("base: micro-moe-llava\ntokens:\n  eos: null\n")
    refused = run("train", spec, "--data", task, "--stage", "align", "-o", tmp_path / "cli")
    assert refused.exit_code == 1 and not (tmp_path / "cli").exists()
    assert refused.output.strip().splitlines() == [  # with training stages it is the spec's own error, located
        f"{spec}:3:8: error: tokens.eos: null, but the training stages end every answer with eos (so the model "
        "learns to stop); set it, or drop the training section"]


@pytest.mark.parametrize("name, text, says", [
    ("no-answer.json", [{"conversations": [{"from": "human", "value": "hi"}]}],
     r"no-answer.json: record 0: nothing to learn from \(no gpt turn\)"),
    ("typo.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
                    {"imagee": "a.png", "conversations": []}],
     r"typo.jsonl:2: unknown key 'imagee'; did you mean 'image'\?"),
    ("turn.json", [{"conversations": [{"from": "human", "valeu": "hi"}]}],
     r"record 0: conversations\[0\]: unknown key 'valeu'; did you mean 'value'\?"),
    ("image.json", [{"image": 3, "conversations": [{"from": "human", "value": "<image>"}]}],
     r"record 0: 'image' must be a path \(a string\), not int"),
    ("broken.jsonl", "{}\n\n{oops\n", r"broken.jsonl:3: not valid JSON"),
    ("binary.json", b"\xff\xfe\x00[", r"binary.json: not UTF-8 text")])
def test_bad_records_are_named_by_record_or_line(tmp_path, name, text, says):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif isinstance(text, str):
        path.write_text(text)
    else:
        path.write_text("\n".join(map(json.dumps, text)) if name.endswith(".jsonl") else json.dumps(text))
    model = moebuild.build("micro-moe-llava")
    with pytest.raises(DataError, match=says):
        train(model, path, tmp_path / "run", Settings(stage="align", steps=1))
    assert not (tmp_path / "run").exists()


def test_every_answer_cut_by_max_length_is_refused(tmp_path):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a long question " * 8},
                                                   {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(DataError, match="cutting to max_length 16 leaves no answer token"):
        train("micro-moe-llava", path, tmp_path / "run", Settings(stage="align", steps=1, max_length=16))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, task):
    def interrupt(step, loss):
        raise KeyboardInterrupt

    for run_dir in (tmp_path / "new", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(KeyboardInterrupt):
            train("micro-moe-llava", task, run_dir, Settings(stage="align", steps=3, batch_size=2, log_every=1),
                  progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())
    rerun = train("micro-moe-llava", task, tmp_path / "new", Settings(stage="align", steps=1, batch_size=2))
    assert rerun.step == 1  # the same command runs again: nothing was left to refuse


def test_resume_refuses_another_spec_no_steps_left_and_an_incomplete_checkpoint(tmp_path, task):
    settings = Settings(stage="align", steps=1, batch_size=2)
    train("micro-moe-llava", task, tmp_path / "r", settings)
    with pytest.raises(TrainError, match="at step 1 already, and --steps counts all the run's steps; give more than 1"):
        train("micro-moe-llava", task, tmp_path / "r", settings, resume=True)
    more = Settings(stage="align", steps=2, batch_size=2)
    other = moebuild.build(moebuild.load_spec("micro-moe-llava", ["moe.balancing.0.coef=0.5"]))
    with pytest.raises(TrainError, match=r"the spec differs from the one the run was started with \(moe.balancing\[0\].coef\)"):
        train(other, task, tmp_path / "r", more, resume=True)
    with pytest.raises(TrainError, match=r"the spec differs .*\(description, moe.balancing\[0\].tokens, .*and \d+ more\)"):
        train("micro-ltdr", task, tmp_path / "r", more, resume=True)  # not a raw state-dict error
    (tmp_path / "r" / "checkpoint-000002").mkdir()
    with pytest.raises(TrainError, match="checkpoint-000002: not a complete checkpoint .*resume from checkpoint-000001"):
        train("micro-moe-llava", task, tmp_path / "r", more, resume=True)


def test_resume_checks_the_checkpoint_once(tmp_path, task, monkeypatch):
    import moebuild.train as training
    from moebuild.train import loop

    calls = []
    counted = loop.check_resumable

    def counting(*args):
        calls.append(args[2])
        return counted(*args)

    monkeypatch.setattr(training, "check_resumable", counting)
    monkeypatch.setattr(loop, "check_resumable", counting)
    args = ["train", "micro-moe-llava", "--data", task, "--stage", "align", "--batch-size", 2, "-o", tmp_path / "r"]
    assert run(*args, "--steps", 1).exit_code == 0 and calls == []
    resumed = run(*args, "--steps", 2, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert calls == [tmp_path / "r" / "checkpoint-000001"]  # the CLI's check, not again in train nor Run.resume
    train("micro-moe-llava", task, tmp_path / "r", Settings(stage="align", steps=3, batch_size=2), resume=True)
    assert calls[1:] == [tmp_path / "r" / "checkpoint-000002"]


def test_a_trainable_pattern_that_matches_nothing_is_refused_before_training(tmp_path, task):
    spec = tmp_path / "s.yaml"
    spec.write_text("base: micro-moe-llava\ntraining:\n  stages:\n    - name: align\n"
                    "      trainable: [language.model.layerz.*]\n")
    refused = run("train", spec, "--data", task, "--stage", "align", "-o", tmp_path / "r")
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "language.model.layerz.* matches no parameter" in refused.output and not (tmp_path / "r").exists()


@pytest.mark.parametrize("option, value, says", [
    ("--lr", "nan", "'nan' is not a number"), ("--lr", "2", "not in the range 0<x<=1"),
    ("--seed", str(2**64), "not in the range 0<=x<=4294967295")])
def test_numbers_out_of_range_are_usage_errors(tmp_path, task, option, value, says):
    refused = run("train", "micro-moe-llava", "--data", task, "-o", tmp_path / "r", option, value)
    assert refused.exit_code == 2 and says in refused.output and not (tmp_path / "r").exists()


def test_a_directory_of_another_system_is_named_not_loaded(tmp_path, task):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    refused = run("train", tmp_path / "llama", "--data", task, "-o", tmp_path / "r")
    assert refused.exit_code == 1
    assert refused.output.strip() == (f"Error: {tmp_path / 'llama'}: not a moebuild model directory (a 'llama' "
                                      "checkpoint; `moebuild import` converts released checkpoints)")


def test_a_pipe_or_a_device_is_refused_not_read(tmp_path, task):
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)
    for data in (fifo, "/dev/zero"):
        with pytest.raises(DataError, match="is not a regular file"):  # before: blocked, or read until memory ran out
            train("micro-moe-llava", data, tmp_path / "run", Settings(stage="align", steps=1, batch_size=1))
    record = {"image": "data.fifo", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "img.json").write_text(json.dumps([record]))
    with pytest.raises(DataError, match="image .*data.fifo.*is not a regular file"):
        train("micro-moe-llava", tmp_path / "img.json", tmp_path / "run", Settings(stage="align", steps=1, batch_size=1))
    with pytest.raises(TrainError, match="--batch-size 100000000 is more than the 12 records"):  # before: a near-endless loop
        train("micro-moe-llava", task, tmp_path / "run", Settings(stage="align", steps=1, batch_size=100_000_000))
    assert not (tmp_path / "run").exists()


def test_sigterm_unwinds_a_cli_run_like_ctrl_c(tmp_path, task):
    script = (f"import os, signal, sys; from moebuild.cli import main; import moebuild.train.loop as loop\n"
              f"loop.Run.train = lambda self, progress=None: os.kill(os.getpid(), signal.SIGTERM)\n"
              f"main(['train', 'micro-moe-llava', '--data', {str(task)!r}, '-o', {str(tmp_path / 'r')!r}, '--batch-size', '2'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert not (tmp_path / "r").exists()  # the default handler would have left r/ behind

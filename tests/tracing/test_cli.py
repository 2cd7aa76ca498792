"""`moebuild trace` end to end on a micro preset and a generated image+text dataset."""

import json
import os
import re

import numpy as np
from click.testing import CliRunner
from PIL import Image

from moebuild.cli import main


def _dataset(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32 + 8 * i, 48, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        lines.append(json.dumps({"prompt": f"<image> describe picture {i}", "image": f"im{i}.png"}))
    lines.append(json.dumps({"prompt": "a prompt without a picture"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl"


def test_trace_writes_json_figures_and_html(tmp_path):
    data = _dataset(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["trace", "micro-ltdr", "--data", str(data), "-o", str(out),
                                       "--batch-size", "2", "--layer", "2"])
    assert result.exit_code == 0, result.output
    routing = json.loads((out / "routing.json").read_text())
    assert [layer["layer"] for layer in routing["layers"]] == [0, 2]
    assert len(routing["images"]) == 3
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["load_heatmap.png", "load_distribution.png", "rpv_histogram.png", "coactivation.png",
                           "patch_map_0.png", "patch_map_1.png", "patch_map_2.png"])
    for name in pngs:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert np.asarray(image.convert("RGB")).std() > 0, name
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == len(pngs)
    for name in pngs:
        assert f'alt="{name}"' in page
    assert "src=\"http" not in page and "src=\"file" not in page  # self-contained


def test_trace_refuses_bad_input_cleanly(tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["trace", "micro-ltdr", "-o", str(out)])
    assert result.exit_code != 0 and "--data" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "<image> where is it"}\n')
    result = runner.invoke(main, ["trace", "micro-ltdr", "--data", str(bad), "-o", str(out)])
    assert result.exit_code == 1 and "placeholder" in result.output and "Traceback" not in result.output
    assert not out.exists()  # never a half-written output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    result = runner.invoke(main, ["trace", "micro-ltdr", "--prompt", "hi", "-o", str(tmp_path / "full")])
    assert result.exit_code == 1 and "not empty" in result.output


def test_trace_never_replaces_the_model_it_reads(tmp_path):
    model = tmp_path / "m"
    assert CliRunner().invoke(main, ["compile", "micro-ltdr", "-o", str(model)]).exit_code == 0
    before = sorted(p.name for p in model.iterdir())
    for output in (model, tmp_path):
        result = CliRunner().invoke(main, ["trace", str(model), "--prompt", "hi", "-o", str(output), "--force"])
        assert result.exit_code == 1, result.output
        assert "refusing to replace" in result.output and "the input" in result.output
    assert sorted(p.name for p in model.iterdir()) == before


def test_trace_data_lines_with_an_unknown_key_or_bytes_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": "x", "imagee": "a.png"}\n')
    result = CliRunner().invoke(main, ["trace", "micro-ltdr", "--data", str(bad), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.output.strip() == (f"Error: {bad}:2: unknown key 'imagee'; did you mean 'image'? "
                                     "(a line holds 'prompt' and 'image')")
    bad.write_bytes(b"\xff\xfe{")
    result = CliRunner().invoke(main, ["trace", "micro-ltdr", "--data", str(bad), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "not UTF-8 text" in result.output


def test_a_pipe_as_data_or_image_is_refused_not_read(tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    for args in (["--data", str(fifo)], ["--image", str(fifo), "--prompt", "hi"]):
        result = CliRunner().invoke(main, ["trace", "micro-ltdr", *args, "-o", str(tmp_path / "out")])
        assert result.exit_code == 1 and result.output.strip() == f"Error: {fifo}: is not a regular file but a pipe"


def test_a_seed_for_a_model_directory_is_refused_not_ignored(tmp_path):
    assert CliRunner().invoke(main, ["compile", "micro-ltdr", "-o", str(tmp_path / "m")]).exit_code == 0
    result = CliRunner().invoke(main, ["trace", str(tmp_path / "m"), "--prompt", "hi", "--seed", "3",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--seed initialises a model built from a spec" in result.output

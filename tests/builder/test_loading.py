"""Spec loading: base: inheritance, !delete / !replace, overrides, interpolation, located errors."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from moebuild.spec.errors import Diagnostic, SpecError, did_you_mean, format_path
from moebuild.spec.loading import dump_yaml, load_spec, resolve_spec
from moebuild.spec.presets import list_presets, preset_family, preset_path

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(autouse=True)
def _in_tests_data(monkeypatch):
    """Diagnostics name files relative to the current directory; pin it."""
    monkeypatch.chdir(DATA)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def errors(spec, overrides=()) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(spec, overrides)
    assert str(info.value) == "\n".join(str(d) for d in info.value.diagnostics)
    return str(info.value).splitlines()


# --- diagnostics -------------------------------------------------------------------------------

def test_diagnostic_format():
    d = Diagnostic("a.yaml", 3, 7, ("moe", "routes", 0, "router", "top_k"), "must be <= 4")
    assert str(d) == "a.yaml:3:7: error: moe.routes[0].router.top_k: must be <= 4"
    assert str(Diagnostic("dir", None, None, (), "is a directory")) == "dir: error: is a directory"
    assert format_path(("a", 0, 1, "b")) == "a[0][1].b"
    assert did_you_mean("tpo_k", ["top_k", "score"]) == "; did you mean 'top_k'?"
    assert did_you_mean("zzz", ["top_k"]) == ""


# --- presets -----------------------------------------------------------------------------------

def test_presets_listed_with_family():
    names = list_presets()
    assert {"micro-moe-llava", "micro-deepseek-vl2", "micro-ltdr"} <= set(names)
    assert preset_family("micro-ltdr") == "ltdr"
    assert preset_path("micro-moe-llava").name == "micro-moe-llava.yaml"
    stems = [p.stem for p in preset_path(names[0]).parents[1].glob("*/*.yaml")]
    assert sorted(stems) == names  # no two families share a name
    with pytest.raises(LookupError, match="did you mean 'micro-ltdr'"):
        preset_path("micro-ltrd")


@pytest.mark.parametrize("name", list_presets())
def test_resolved_spec_round_trips(name, tmp_path):
    spec = load_spec(name)
    written = write(tmp_path / "resolved.yaml", dump_yaml(spec.model_dump(mode="json")))
    assert load_spec(written) == spec


# --- inheritance -------------------------------------------------------------------------------

def test_base_merge_delete_replace_and_type_change():
    assert resolve_spec("inherit/child.yaml") == {
        "name": "child",
        "vision": {"type": "siglip", "image_size": 64},  # type changed: nothing of clip's kept
        "connector": {"type": "mlp", "depth": 3, "activation": "gelu"},
        "moe": {
            "layers": [1],
            "pools": {"experts": {"num_experts": 8}},
            "dispatch": {"backend": "gelu"},  # interpolated after merging
        },
    }


def test_base_by_preset_name_inherits_everything_but_what_is_written(tmp_path):
    child = write(tmp_path / "c.yaml", """\
        base: micro-moe-llava
        name: mine
        language: {num_layers: 2}
    """)
    data, preset = resolve_spec(child), resolve_spec("micro-moe-llava")
    assert data["name"] == "mine" and data["language"]["num_layers"] == 2
    preset["name"], preset["language"]["num_layers"] = "mine", 2
    assert data == preset


def test_inherited_value_is_located_in_the_base_file(tmp_path):
    write(tmp_path / "parent.yaml", """\
        base: micro-moe-llava
        vision: {image_size: -5}
    """)
    write(tmp_path / "child.yaml", "base: parent.yaml\nname: child\n")
    (line,) = errors(tmp_path / "child.yaml")
    assert line == f"{tmp_path / 'parent.yaml'}:2:22: error: vision.image_size: must be >= 1, got -5"


def test_delete_of_a_key_not_inherited_is_an_error(tmp_path):
    spec = write(tmp_path / "s.yaml", "base: micro-moe-llava\nmoe: {dispatchh: !delete }\n")
    (line,) = errors(spec)
    assert line == f"{spec}:2:7: error: moe.dispatchh: !delete: no inherited key 'dispatchh' to delete"


def test_unknown_tag(tmp_path):
    spec = write(tmp_path / "s.yaml", "base: micro-moe-llava\nname: !rplace x\n")
    assert errors(spec) == [f"{spec}:2:7: error: name: unknown tag '!rplace'; expected !delete or !replace"]


def test_cycle_names_the_chain():
    assert errors("broken/cycle_a.yaml") == [
        "broken/cycle_b.yaml:1:7: error: base: cyclic base: "
        "broken/cycle_a.yaml -> broken/cycle_b.yaml -> broken/cycle_a.yaml"]


def test_missing_base_file(tmp_path):
    spec = write(tmp_path / "s.yaml", "base: ../nowhere.yaml\n")
    (line,) = errors(spec)
    assert line.startswith(f"{spec}:1:7: error: base: base file '../nowhere.yaml' does not exist")


@pytest.mark.parametrize("base, says", [
    ("micro-moe-llava.yaml", "base file 'micro-moe-llava.yaml' does not exist (looked at micro-moe-llava.yaml); "
                             "did you mean the preset 'micro-moe-llava'?"),
    ("sub/micro-ltdr.yml", "base file 'sub/micro-ltdr.yml' does not exist (looked at sub/micro-ltdr.yml); "
                           "did you mean the preset 'micro-ltdr'?"),
    ("fifo.yaml", "base file 'fifo.yaml' is not a regular file but a pipe (looked at fifo.yaml)"),
    ("zero.yaml", "base file 'zero.yaml' is not a regular file but a device (looked at zero.yaml)"),
    ("dangling.yaml", "base file 'dangling.yaml' is a broken symlink (looked at dangling.yaml)"),
    ("dir.yaml", "base file 'dir.yaml' is a directory, not a file (looked at dir.yaml)"),
])
def test_a_base_that_is_no_file_says_what_it_is(base, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo.yaml")
    os.symlink("/dev/zero", "zero.yaml")
    os.symlink("nowhere.yaml", "dangling.yaml")
    os.mkdir("dir.yaml")
    write(tmp_path / "s.yaml", f"base: {base}\n")
    assert errors("s.yaml") == [f"s.yaml:1:7: error: base: {says}"]


def test_a_spec_file_named_after_a_preset_that_does_not_exist_suggests_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert errors("micro-moe-llava.yaml") == ["micro-moe-llava.yaml: error: no such file; "
                                              "did you mean the preset 'micro-moe-llava'?"]
    assert errors("unrelated.yaml") == ["unrelated.yaml: error: no such file"]


def test_a_directory_named_after_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("micro-moe-llava")
    assert load_spec("micro-moe-llava") == load_spec(preset_path("micro-moe-llava"))
    assert errors("./micro-moe-llava") == ["./micro-moe-llava: error: is a directory, not a YAML spec file"]
    write(tmp_path / "micro-ltdr", "name: x\n")  # a regular file of that name is still the file
    assert errors("micro-ltdr") == ["micro-ltdr:1:1: error: missing required key 'language'"]


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("files, tokenizer, says", [
    ({}, "gpt2", "'gpt2': no such directory (tokenizer: names a local directory; moebuild downloads nothing)"),
    ({}, "/no/such/dir", "'/no/such/dir': no such directory"),
    ({}, "/etc/passwd", "'/etc/passwd': is a file; give the tokenizer's directory"),
    ({}, "tok", "'tok': holds no tokenizer.json and no vocabulary file (tokenizer.model, spiece.model, "
                "sentencepiece.bpe.model, vocab.json, vocab.txt)"),
    ({"tokenizer_config.json": "{}"}, "tok", "'tok': holds no tokenizer.json and no vocabulary file (tokenizer.model, "
                                             "spiece.model, sentencepiece.bpe.model, vocab.json, vocab.txt); "
                                             "tokenizer_config.json alone is not a tokenizer"),
    ({"vocab.txt": "a\n"}, "tok", "'tok': holds vocab.txt but no tokenizer_config.json or config.json naming its "
                                  "tokenizer class"),
])
def test_tokenizer_directory_must_hold_a_tokenizer(files, tokenizer, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    for name, text in files.items():
        (tmp_path / "tok" / name).write_text(text)
    write(tmp_path / "s.yaml", f"base: micro-moe-llava\ntokenizer: {tokenizer}\n")
    assert errors("s.yaml") == [f"s.yaml:2:12: error: tokenizer: {says}"]


@pytest.mark.parametrize("files", [{"tokenizer.json": "{}"}, {"tokenizer.model": "", "tokenizer_config.json": "{}"},
                                   {"vocab.json": "{}", "config.json": "{}"}])
def test_tokenizer_directories_that_pass(files, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert load_spec("micro-moe-llava", [f"tokenizer={tmp_path}"]).tokenizer == str(tmp_path)


# --- overrides ---------------------------------------------------------------------------------

def test_override_forms():
    data = resolve_spec("micro-moe-llava", [
        "moe.pools.experts.num_experts=8",  # change
        "moe.routes[0].router.dtype=bfloat16",  # [i] index
        "moe.routes.0.router.eval_noise=false",  # .i index
        "+moe.pools.shared={num_experts: 2, intermediate_size: 64}",  # add a mapping
        "++language.num_layers=2",  # set existing
        "++vision.pretrained=null",  # set (exists as key? either way)
        "~moe.balancing",  # delete
        "moe.layers=[0, 2]",  # YAML flow list
        "moe.routes.0.router.capacity={train: 2.0}",  # mapping value merges into the mapping
    ])
    moe = data["moe"]
    assert moe["pools"]["experts"]["num_experts"] == 8
    assert moe["pools"]["shared"] == {"num_experts": 2, "intermediate_size": 64}
    assert moe["routes"][0]["router"]["dtype"] == "bfloat16" and moe["routes"][0]["router"]["eval_noise"] is False
    assert moe["routes"][0]["router"]["capacity"] == {"train": 2.0, "eval": 2.0, "min": 0}
    assert moe["layers"] == [0, 2] and "balancing" not in moe
    assert data["language"]["num_layers"] == 2 and data["vision"]["pretrained"] is None


def test_override_value_error_names_the_override():
    (line,) = errors("micro-moe-llava", ["moe.pools.experts.num_experts=abc"])
    assert line == ("<override 'moe.pools.experts.num_experts=abc'>:1:31: error: "
                    "moe.pools.experts.num_experts: expected an integer, got 'abc'")


def test_override_cross_field_error_names_the_override():
    (line,) = errors("micro-deepseek-vl2", ["moe.routes.1.router.top_k=17"])
    assert line == ("<override 'moe.routes.1.router.top_k=17'>:1:27: error: moe.routes[1].router.top_k: "
                    "must be <= 16 (pool 'routed' has 16 experts)")


@pytest.mark.parametrize("override, message", [
    ("moe.pools.experts.num_expert=8",
     "moe.pools.experts.num_expert: no such key; did you mean 'num_experts'? "
     "(to add a key, write '+moe.pools.experts.num_expert=8')"),
    ("+name=x", "name: key already exists; to change it write 'name=x' (or '++name=x' to set it either way)"),
    ("~moe.nothing", "moe.nothing: no such key"),
    ("moe.routes.3.pool=x", "moe.routes[3]: no item 3: the list has 1 items"),
    ("name.x=1", "name.x: 'name' is a scalar, not a mapping or list"),
    ("moe..layers=1", "malformed key 'moe..layers'; write keys as a.b.c, list items as a.0.b or a[0].b"),
    ("moe.layers", "expected 'key=value', '+key=value', '++key=value' or '~key', got 'moe.layers'"),
    ("~name=x", "name: '~key' deletes a key and takes no value"),
    ("name=!delete", "name: to delete a key write '~name'"),
    ("+moe.routes.2={pool: experts}", "moe.routes[2]: no item 2: the list has 1 items (a new one goes at 1)"),
    *[(f"{op}base=micro-ltdr", "base: cannot be set by an override (the base chain is merged before overrides "
                               "apply); write a spec file with 'base: micro-ltdr' instead") for op in ("", "+", "++")],
    *[(text, "base: cannot be changed by an override (the base chain is merged before overrides apply); "
             "edit the spec file's 'base:' line instead") for text in ("~base", "base=null", "base.x=1")],
])
def test_bad_override(override, message):
    lines = errors("micro-moe-llava", [override])
    assert lines == [f"<override {override!r}>:1:1: error: {message}"]


@pytest.mark.parametrize("overrides, message", [
    (["language.num_layers=2", "language.num_layers=6"],
     "language.num_layers: the same key as the override 'language.num_layers=2' before it; give each key once "
     "(the last would silently win)"),
    (["moe.routes.0.router.dtype=float32", "++moe.routes[0].router.dtype=bfloat16"],
     "moe.routes[0].router.dtype: the same key as the override 'moe.routes.0.router.dtype=float32' before it; "
     "give each key once (the last would silently win)"),
    (["~moe.balancing", "+moe.balancing=[]"],
     "moe.balancing: the same key as the override '~moe.balancing' before it; give each key once "
     "(the last would silently win)"),
    (["moe.routes.0.router.capacity.train=1.2", "moe.routes.0.router={capacity: {train: 1.3}}"],
     "moe.routes[0].router: would overwrite moe.routes[0].router.capacity.train, which the override "
     "'moe.routes.0.router.capacity.train=1.2' before it sets; give the key once, or put the more specific "
     "override last"),
    (["moe.routes.0.router.capacity={train: 1.2, eval: 2.5}", "moe.routes.0.router={capacity: {eval: 1.3}}"],
     "moe.routes[0].router: would overwrite moe.routes[0].router.capacity.eval, which the override "
     "'moe.routes.0.router.capacity={train: 1.2, eval: 2.5}' before it sets; give the key once, or put the more "
     "specific override last"),
    (["moe.routes.0.router.capacity.train=1.2", "moe.routes=[{pool: experts}]"],
     "moe.routes: would overwrite moe.routes[0].router.capacity.train, which the override "
     "'moe.routes.0.router.capacity.train=1.2' before it sets; give the key once, or put the more specific "
     "override last"),
    (["moe.pools.experts.num_experts=8", "~moe"],
     "moe: would delete moe.pools.experts.num_experts, which the override 'moe.pools.experts.num_experts=8' before "
     "it sets; give the key once, or put the more specific override last"),
])
def test_an_override_may_not_undo_an_earlier_one(overrides, message):
    assert errors("micro-moe-llava", overrides) == [f"<override {overrides[1]!r}>:1:1: error: {message}"]


def test_overrides_that_refine_earlier_ones_apply_in_order():
    data = resolve_spec("micro-moe-llava", [
        "moe.routes.0.router.capacity={train: 1.2}", "moe.routes.0.router.capacity.eval=1.3",  # below: refines
        "moe.routes.0.router.capacity.min=1", "moe.routes.0.router={dtype: bfloat16}",  # above, merging other keys
        "moe.layers=[0, 1]", "moe.layers.1=2",
    ])
    assert data["moe"]["routes"][0]["router"]["capacity"] == {"train": 1.2, "eval": 1.3, "min": 1}
    assert data["moe"]["routes"][0]["router"]["dtype"] == "bfloat16"
    assert data["moe"]["layers"] == [0, 2]


def test_bad_override_value_yaml():
    (line,) = errors("micro-moe-llava", ["moe.layers=[0, 2"])
    assert line.startswith("<override 'moe.layers=[0, 2'>:1:12: error: moe.layers: value '[0, 2' is not valid YAML")


def test_plus_creates_missing_parents_and_appends_list_items():
    data = resolve_spec("micro-moe-llava", ["+extra.deep.key=1", "+moe.routes.1={tokens: image}"])
    assert data["extra"] == {"deep": {"key": 1}}
    assert data["moe"]["routes"][1] == {"tokens": "image"}


# --- interpolation -----------------------------------------------------------------------------

def test_interpolation_sees_overrides_and_copies_mappings(tmp_path):
    spec = write(tmp_path / "s.yaml", """\
        base: micro-moe-llava
        moe:
          pools:
            experts: {intermediate_size: "${language.intermediate_size}"}
        training: {stages: [{name: "${name}-moe", trainable: [moe]}]}
        copy: ${moe.routes.0.router.capacity}
    """)
    data = resolve_spec(spec, ["language.intermediate_size=96"])
    assert data["moe"]["pools"]["experts"]["intermediate_size"] == 96
    assert data["training"]["stages"][0]["name"] == "micro-moe-llava-moe"
    assert data["copy"] == {"train": 1.5, "eval": 2.0, "min": 0}


def test_interpolation_error_is_located_and_not_repeated(tmp_path):
    spec = write(tmp_path / "s.yaml", """\
        base: micro-moe-llava
        language: {num_layers: "${language.num_layer}"}
    """)
    (line,) = errors(spec)
    assert line == (f"{spec}:2:24: error: language.num_layers: cannot resolve '${{language.num_layer}}': "
                    "Interpolation key 'language.num_layer' not found")


# --- validation errors -------------------------------------------------------------------------

def test_all_errors_of_a_file_at_once():
    assert errors("broken/many_errors.yaml") == [
        "broken/many_errors.yaml:4:15: error: vision.image_size: expected an integer, got 'abc'",
        "broken/many_errors.yaml:5:3: error: vision: unknown key 'patch_sise'; did you mean 'patch_size'?",
        "broken/many_errors.yaml:8:15: error: moe.routes[0].tokens: expected 'all', 'text' or 'image', "
        "got 'texts'; did you mean 'text'?",
        "broken/many_errors.yaml:10:45: error: moe.routes[0].router.score: expected 'softmax' or 'sigmoid', "
        "got 'softmx'; did you mean 'softmax'?",
    ]


def test_unknown_router_type_lists_the_types():
    (line,) = errors("broken/unknown_type.yaml")
    assert line.startswith("broken/unknown_type.yaml:7:22: error: moe.routes[0].router.type: unknown type 'topkk'; "
                           "expected one of: topk")
    assert line.endswith("did you mean 'topk'?")


def test_missing_type_and_missing_key(tmp_path):
    spec = write(tmp_path / "s.yaml", """\
        base: micro-moe-llava
        connector: !replace {depth: 2}
        moe:
          pools: {experts: !replace {intermediate_size: 64}}
    """)
    lines = errors(spec)
    assert lines[0].startswith(f"{spec}:2:1: error: connector: missing required key 'type' (one of: linear, mlp")
    assert lines[1] == f"{spec}:4:11: error: moe.pools.experts: missing required key 'num_experts'"


def test_plain_union_reports_the_member_that_fits(tmp_path):
    lines = errors("micro-moe-llava", ["moe.layers=[0, x]"])
    assert lines == ["<override 'moe.layers=[0, x]'>:1:16: error: moe.layers[1]: expected an integer, got 'x'"]


@pytest.mark.parametrize("override, col, message", [
    ("language.num_layers=true", 21, "language.num_layers: expected an integer, got true"),
    ("language.num_layers=2.0", 21, "language.num_layers: expected an integer, got 2.0"),
    ("language.num_layers=1e0", 21, "language.num_layers: expected an integer, got 1.0"),
    ("language.hidden_size='128'", 22, "language.hidden_size: expected an integer, got '128'"),
    ("language.qkv_bias=yes", 19, "language.qkv_bias: expected true or false, got 'yes'"),
    ("tokens.bos=false", 12, "tokens.bos: expected an integer, got false"),
    ("moe.layers=[0, true]", 16, "moe.layers[1]: expected an integer, got true"),
    ("vision.layer_norm_eps='1e-5'", 23, "vision.layer_norm_eps: expected a number, got '1e-5'"),
])
def test_values_are_not_coerced(override, col, message):
    assert errors("micro-moe-llava", [override]) == [f"<override {override!r}>:1:{col}: error: {message}"]


def test_a_number_takes_an_integer_and_an_interpolated_integer_stays_one(tmp_path):
    spec = write(tmp_path / "s.yaml", """\
        base: micro-moe-llava
        vision: {layer_norm_eps: 1, hidden_size: "${language.num_heads}${language.num_heads}"}
        moe: {pools: {experts: {intermediate_size: "${language.intermediate_size}"}}}
    """)
    (line,) = errors(spec)
    assert line == f"{spec}:2:42: error: vision.hidden_size: expected an integer, got '44'"  # joined text is a string
    loaded = load_spec(spec, ["vision.hidden_size=64"])
    assert loaded.vision.layer_norm_eps == 1.0 and loaded.moe.pools["experts"].intermediate_size == 256


def test_change_a_key_left_to_its_default():
    data = resolve_spec("micro-moe-llava", ["moe.dispatch.backend=torch", "moe.routes.0.router.eval_noise=false"])
    assert data["moe"]["dispatch"] == {"backend": "torch"}
    assert data["moe"]["routes"][0]["router"]["eval_noise"] is False
    assert load_spec("micro-moe-llava", ["moe.dispatch.backend=torch"]).moe.dispatch.backend == "torch"


def test_merge_keys_merge_with_written_keys_winning_and_keep_their_place(tmp_path):
    spec = write(tmp_path / "s.yaml", """\
        base: micro-moe-llava
        moe:
          pools:
            experts: &pool {num_experts: 4, intermediate_size: 256, activation: silu, init: upcycle}
          routes:
            - tokens: all
              pool: experts
              causal: false
              router: {type: deepspeed_top2, capacity: &cap {train: 1.5, eval: 2.0, min: 0}}
        tokens:
          <<: [{pad: 303, bos: 304}, {pad: 305, eos: 306}]
          bos: 307
    """)
    loaded = load_spec(spec)
    assert (loaded.tokens.pad, loaded.tokens.bos, loaded.tokens.eos) == (303, 307, 306)
    bad = write(tmp_path / "bad.yaml", """\
        base: micro-moe-llava
        shared: &s {pad: -1}
        tokens:
          <<: *s
    """)
    lines = errors(bad)
    assert f"{bad}:2:1: error: unknown key 'shared'" in lines
    assert f"{bad}:2:18: error: tokens.pad: must be >= 0, got -1" in lines  # where the anchor wrote it


def test_duplicate_keys_are_named_with_the_first_place(tmp_path):
    spec = write(tmp_path / "s.yaml", "base: micro-moe-llava\nname: a\nname: b\n")
    assert errors(spec) == [f"{spec}:3:1: error: name: duplicate key 'name' (first at line 2)"]

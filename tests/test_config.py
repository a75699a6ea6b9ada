"""The run config: TOML round trips, overrides, validation messages, batch layout, run identity."""

from __future__ import annotations

import dataclasses

import pytest

from lokr_trainer.config import (
    RunConfig,
    TrainConfig,
    apply_override,
    load_config,
    run_defining_dict,
    save_config,
    schema,
)
from lokr_trainer.data.tags import CaptionConfig
from lokr_trainer.errors import ConfigError
from lokr_trainer.lokr.targets import FactorRule, LoKrConfig

MINIMAL = """
[model]
path = "/models/sdxl.safetensors"

[data]
path = "/data/images"

[train]
max_steps = 100
"""


def minimal(**tables) -> dict:
    """The smallest valid config dict, with some tables merged in."""
    d = {"model": {"path": "/m.safetensors"}, "data": {"path": ["/d"]}, "train": {"max_steps": 10}}
    for name, table in tables.items():
        d[name] = {**d.get(name, {}), **table}
    return d


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(data)
    return str(e.value)


@pytest.fixture
def toml_file(tmp_path):
    def write(text: str, name: str = "run.toml"):
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p

    return write


# --------------------------------------------------------------------------- round trips


def test_minimal_file_fills_defaults_and_round_trips_through_toml(toml_file, tmp_path):
    cfg = load_config(toml_file(MINIMAL))
    assert cfg.data.path == ["/data/images"]  # a string becomes a one-item list
    assert cfg.train.grad_accum is None and cfg.train.accumulation(1) == (1, 1)
    assert cfg.lokr == LoKrConfig()
    saved = save_config(cfg, tmp_path / "out" / "config.toml")
    assert not saved.with_name("config.toml.tmp").exists()
    again = load_config(saved)
    assert again == cfg
    assert again.to_toml() == cfg.to_toml()


def test_every_table_non_default_round_trips(toml_file):
    text = MINIMAL.replace('max_steps = 100', 'epochs = 3\nglobal_batch = 8\nbatch_size = 2\nseed = 7') + """
[diffusion]
prediction = "v_prediction"
zero_terminal_snr = true
min_timestep = 10
max_timestep = 990
ip_noise_gamma = 0.05

[optimizer]
name = "lion8bit"
betas = [0.9, 0.95]
weight_decay = 0.1
te2_lr = 5e-6

[scheduler]
name = "cosine"
warmup_steps = 100
min_lr_ratio = 0.1

[sample]
every = 50
prompts = ["1girl, solo", "a cat"]

[validation]
path = ["/held/out"]
every = 100
timesteps = [250, 750]
"""
    cfg = load_config(toml_file(text))
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.train.global_batch == 8 and cfg.train.grad_accum is None
    assert "grad_accum" not in cfg.to_dict()["train"]  # what the user did not give stays unset
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert load_config(toml_file(cfg.to_toml(), "again.toml")) == cfg


def test_lokr_preset_with_overrides_and_rules_round_trips(toml_file):
    text = MINIMAL + """
[lokr]
preset = "kohaku-xl-delta"
factor = 6
exclude = "*time_embed*"

[[lokr.rules]]
kind = ["resnet_conv"]
factor = 4
alpha = 2

[[lokr.rules]]
pattern = "*out_blocks*"
skip = true
"""
    cfg = load_config(toml_file(text))
    lokr = cfg.lokr
    assert lokr.preset == "kohaku-xl-delta" and lokr.targets == "full"  # from the preset
    assert lokr.factor == 6 and lokr.exclude == ("*time_embed*",)
    assert lokr.rules == (
        FactorRule(kind=("resnet_conv",), factor=4, alpha=2.0),
        FactorRule(pattern=("*out_blocks*",), skip=True),
    )
    # LoKrConfig's own serialisation round-trips, and so does the whole file
    assert LoKrConfig.from_dict(lokr.to_dict()) == lokr
    assert load_config(toml_file(cfg.to_toml(), "again.toml")) == cfg
    # the plain preset keeps its four rules through TOML
    plain = load_config(toml_file(MINIMAL + '[lokr]\npreset = "kohaku-xl-delta"\n', "p.toml"))
    assert len(plain.lokr.rules) == 4
    assert load_config(toml_file(plain.to_toml(), "p2.toml")).lokr == plain.lokr == LoKrConfig.from_preset(
        "kohaku-xl-delta"
    )


def test_caption_frozensets_read_from_lists_and_written_sorted(toml_file):
    cfg = RunConfig.from_dict(minimal(caption={"keep_underscore": ["z_z", "a_a"], "people_tags": ["2girls", "1girl"]}))
    assert cfg.caption.keep_underscore == frozenset({"a_a", "z_z"})
    assert isinstance(cfg.caption.people_tags, frozenset)
    out = cfg.to_dict()["caption"]
    assert out["keep_underscore"] == ["a_a", "z_z"] and out["people_tags"] == ["1girl", "2girls"]
    assert load_config(toml_file(cfg.to_toml())).caption == cfg.caption
    # the defaults round-trip too (the long built-in people list)
    assert RunConfig.from_dict(minimal()).caption == CaptionConfig()


# --------------------------------------------------------------------------- overrides


def test_every_override_form(toml_file):
    path = toml_file(MINIMAL)
    cfg = load_config(
        path,
        [
            "train.seed=3",
            "optimizer.betas=[0.9, 0.95]",
            "train.gradient_checkpointing=true",
            "model.path=/x/y.safetensors",  # unquoted string
            'sample.negative_prompt="lowres, bad hands"',  # quoted string
            "lokr.preset=kohaku-xl-delta",
            "data.path=2024",  # a string setting keeps digits as text
            "optimizer.unet_lr = 2e-5",  # spaces around '='
        ],
    )
    assert cfg.train.seed == 3
    assert cfg.optimizer.betas == [0.9, 0.95]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.model.path == "/x/y.safetensors"
    assert cfg.sample.negative_prompt == "lowres, bad hands"
    assert cfg.lokr == LoKrConfig.from_preset("kohaku-xl-delta")
    assert cfg.data.path == ["2024"]
    assert cfg.optimizer.unet_lr == 2e-5


def test_overrides_alone_make_a_config_and_later_ones_win():
    cfg = load_config(None, ["model.path=/m", "data.path=/d", "train.epochs=1", "train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2 and cfg.train.epochs == 1


@pytest.mark.parametrize("bad", ["train.seed", "seed=3", ".seed=3", "train.=3"])
def test_malformed_override_shows_the_right_form(bad):
    with pytest.raises(ConfigError, match=r"table\.key=value, e\.g\. --set train\.seed=3"):
        apply_override({}, bad)


def test_override_with_an_unknown_key_is_caught_by_validation():
    with pytest.raises(ConfigError, match=r"unknown key train\.sed \(did you mean train\.seed\?\)"):
        load_config(None, ["model.path=/m", "data.path=/d", "train.max_steps=1", "train.sed=3"])


# --------------------------------------------------------------------------- validation messages


def test_unknown_key_and_table_suggest_the_closest():
    assert "unknown key train.sead (did you mean train.seed?)" in error_of(minimal(train={"sead": 1}))
    assert "unknown table [trian] (did you mean [train]?)" in error_of({**minimal(), "trian": {}})
    assert "did you mean train.seed?" in error_of({**minimal(), "seed": 1})  # a key outside any table
    assert "unknown key lokr.rules[0].factr (did you mean lokr.rules[0].factor?)" in error_of(
        minimal(lokr={"rules": [{"kind": "attn", "factr": 2}]})
    )


@pytest.mark.parametrize(
    "tables, fragment",
    [
        ({"train": {"seed": "x"}}, "train.seed = 'x': expected an integer"),
        ({"train": {"seed": True}}, "train.seed = true: expected an integer"),  # bool is not an int
        ({"train": {"batch_size": 2.0}}, "train.batch_size = 2.0: expected an integer"),
        ({"optimizer": {"unet_lr": "1e-4"}}, "optimizer.unet_lr = '1e-4': expected a number"),
        ({"optimizer": {"unet_lr": False}}, "optimizer.unet_lr = false: expected a number"),
        ({"train": {"gradient_checkpointing": 1}}, "train.gradient_checkpointing = 1: expected a boolean"),
        ({"optimizer": {"betas": [0.9, "x"]}}, "optimizer.betas[1] = 'x': expected a number"),
        ({"sample": {"prompts": "one prompt"}}, "sample.prompts = 'one prompt': expected a list of strings"),
        ({"lokr": {"full_matrix": "yes"}}, "lokr.full_matrix = 'yes': expected a boolean"),
        ({"caption": {"tag_dropout": "0.1"}}, "caption.tag_dropout = '0.1': expected a number"),
        ({"train": {}, "model": {"path": 3}}, "model.path = 3: expected a string"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(tables, fragment):
    assert fragment in error_of(minimal(**tables))


def test_an_int_is_accepted_where_a_float_is_expected():
    cfg = RunConfig.from_dict(minimal(optimizer={"unet_lr": 1, "betas": [0, 0]}, diffusion={"min_snr_gamma": 5}))
    assert cfg.optimizer.unet_lr == 1.0 and isinstance(cfg.optimizer.unet_lr, float)
    assert cfg.optimizer.betas == [0.0, 0.0] and cfg.diffusion.min_snr_gamma == 5.0


@pytest.mark.parametrize(
    "tables, fragment",
    [
        ({"optimizer": {"name": "sgd"}}, "optimizer.name = 'sgd': expected one of lion8bit, adamw8bit, adamw, lion"),
        ({"model": {"dtype": "fp8"}}, "model.dtype = 'fp8': expected one of fp32, fp16, bf16"),
        ({"lokr": {"targets": "mlp"}}, "lokr.targets = 'mlp': expected one of attn, attn-mlp, full"),
        ({"lokr": {"preset": "delta"}}, "lokr.preset = 'delta': expected one of "),
        ({"lokr": {"components": ["unet", "vae"]}}, "lokr.components contains 'vae': expected one of unet, te1, te2"),
        ({"scheduler": {"name": "linear"}}, "constant, constant_with_warmup, cosine"),
    ],
)
def test_bad_choice_lists_the_allowed_values(tables, fragment):
    assert fragment in error_of(minimal(**tables))


@pytest.mark.parametrize(
    "tables, fragment",
    [
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas = [0.9]: expected exactly 2 values"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas contains 1.0: expected a value in [0, 1)"),
        ({"optimizer": {"unet_lr": -1e-4}}, "optimizer.unet_lr = -0.0001: expected a value >= 0"),
        ({"optimizer": {"unet_lr": float("nan")}}, "expected a finite number"),
        ({"train": {"batch_size": 0}}, "train.batch_size = 0: expected a value >= 1"),
        ({"train": {"keep_last": 0}}, "train.keep_last = 0"),
        ({"data": {"flip_prob": 1.5}}, "data.flip_prob = 1.5: expected a value in [0, 1]"),
        ({"data": {"max_tokens": 100}}, "data.max_tokens = 100: expected a multiple of 75"),
        ({"data": {"resolution": 1000}}, "data.resolution = 1000: must be a multiple of data.bucket_step = 64"),
        ({"data": {"min_bucket": 1024, "max_bucket": 512}}, "data.min_bucket = 1024 is larger than data.max_bucket"),
        ({"diffusion": {"min_timestep": 500, "max_timestep": 500}}, "diffusion.min_timestep = 500 must be below"),
        ({"diffusion": {"max_timestep": 1001}}, "diffusion.max_timestep = 1001: expected a value in (0, 1000]"),
        ({"train": {"epochs": 2}}, "exactly one of train.max_steps and train.epochs"),
        ({"train": {"max_steps": 0}}, "exactly one of train.max_steps and train.epochs"),
        ({"train": {"grad_accum": 2, "global_batch": 8}}, "at most one of train.grad_accum and train.global_batch"),
        ({"validation": {"every": 10}}, "validation.every = 10 needs validation.path"),
        ({"lokr": {"factor": 0}}, "lokr.factor must be a positive integer"),
        ({"lokr": {"dropout": 1.0}}, "lokr.dropout must be in [0, 1)"),
        ({"lokr": {"rules": [{"kind": "atn"}]}}, "lokr.rules[0].kind contains 'atn': expected one of attn"),
        ({"lokr": {"rules": [{"kind": "attn", "factor": 0}]}}, "lokr.rules[0].factor must be a positive integer"),
        ({"lokr": {"rules": [{"factor": 2}]}}, "lokr.rules[0]: a LoKr rule needs at least one of pattern"),
        ({"caption": {"group_dropout": 0.6}}, "caption.group_dropout must be in [0, 0.5]"),
        ({"caption": {"short_tag_max_len": -1}}, "caption.short_tag_max_len = -1"),
    ],
)
def test_out_of_range_values_are_refused_by_name(tables, fragment):
    assert fragment in error_of(minimal(**tables))


def test_missing_paths_say_what_to_set():
    assert "set path in the [model] table or pass --set model.path=" in error_of({"data": {"path": "/d"}})
    assert "data.path is required" in error_of({"model": {"path": "/m"}, "data": {"path": []}})


def test_file_existence_is_not_checked_here():
    cfg = RunConfig.from_dict(minimal(model={"path": "/definitely/not/here.safetensors"}))
    assert cfg.model.path == "/definitely/not/here.safetensors"


def test_toml_syntax_error_names_file_line_and_column(toml_file):
    path = toml_file('[model]\npath = "/m"\nseed 3\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "column" in msg


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- resolution and layout


def test_text_encoder_lrs_resolve_to_unet_lr():
    cfg = RunConfig.from_dict(minimal(optimizer={"unet_lr": 3e-5, "te1_lr": 1e-6}))
    assert (cfg.optimizer.te1_lr, cfg.optimizer.te2_lr) == (1e-6, 3e-5)
    assert cfg.to_dict()["optimizer"]["te2_lr"] == 3e-5  # the saved config holds numbers


def test_global_batch_splits_into_accumulation():
    t = TrainConfig(batch_size=4, global_batch=128, max_steps=1)
    assert t.accumulation(2) == (16, 128)
    assert t.accumulation(1) == (32, 128)
    with pytest.raises(ConfigError) as e:
        TrainConfig(batch_size=4, global_batch=130, max_steps=1).accumulation(2)
    msg = str(e.value)
    assert "train.batch_size = 4 × 2 process(es) = 8" in msg and "nearest valid global batches: 128, 136" in msg
    assert TrainConfig(batch_size=4, grad_accum=3, max_steps=1).accumulation(2) == (3, 24)
    assert TrainConfig(batch_size=4, max_steps=1).accumulation(2) == (1, 8)
    # a global batch that does not even split into per-device batches is refused when loading
    assert "nearest valid global batches: 8, 12" in error_of(minimal(train={"batch_size": 4, "global_batch": 10}))


def test_run_defining_dict_ignores_the_split_of_the_global_batch():
    two_procs = RunConfig.from_dict(minimal(train={"batch_size": 2, "grad_accum": 1}))
    one_proc = RunConfig.from_dict(minimal(train={"batch_size": 2, "grad_accum": 2, "output_dir": "elsewhere"}))
    big_batch = RunConfig.from_dict(minimal(train={"batch_size": 4}, data={"num_workers": 8}, sample={"steps": 5}))
    by_global = RunConfig.from_dict(minimal(train={"batch_size": 1, "global_batch": 4, "save_every": 100}))
    a = run_defining_dict(two_procs, 2)
    assert a == run_defining_dict(one_proc, 1) == run_defining_dict(big_batch, 1) == run_defining_dict(by_global, 1)
    assert a["train.resolved_global_batch"] == 4
    assert "train.batch_size" not in a and not any(k.startswith(("sample.", "validation.")) for k in a)
    assert a["optimizer.betas"] == [0.9, 0.999] and a["lokr.factor"] == 8
    seeded = RunConfig.from_dict(minimal(train={"batch_size": 2, "grad_accum": 1, "seed": 1}))
    assert run_defining_dict(seeded, 2) != a
    assert run_defining_dict(two_procs, 1) != a  # a different global batch is a different run


# --------------------------------------------------------------------------- help


def test_every_field_of_every_table_has_help():
    tables = schema()
    assert list(tables)[:3] == ["model", "lokr", "lokr.rules"]
    expected = {
        "lokr": {f.name for f in dataclasses.fields(LoKrConfig)},
        "lokr.rules": {f.name for f in dataclasses.fields(FactorRule)},
        "caption": {f.name for f in dataclasses.fields(CaptionConfig)},
    }
    for f in dataclasses.fields(RunConfig):
        expected.setdefault(f.name, {g.name for g in dataclasses.fields(f.default_factory)})
    assert set(tables) == set(expected)
    for table, fields in tables.items():
        assert {h.name for h in fields} == expected[table], table
        for h in fields:
            assert h.help.strip(), f"{table}.{h.name} has no help"
            assert h.type
    opt = {h.name: h for h in tables["optimizer"]}
    assert opt["name"].choices == ("lion8bit", "adamw8bit", "adamw", "lion")
    assert opt["betas"].default == [0.9, 0.999] and opt["te1_lr"].type == "float | None"

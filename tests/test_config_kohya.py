"""``python -m lokr_trainer.config from-kohya``: kohya sd-scripts + LyCORIS configs as run configs.

The LoKr part is checked against LyCORIS itself: lycoris.kohya's ``create_network`` is run on a
module skeleton with kohya's SDXL class names and module paths (and CLIP's), and every module it
creates must have exactly the parameter shapes and scale that our converted ``[lokr]`` table gives.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

import pytest
import tomli_w
import torch.nn as nn

from lokr_trainer.config import load_config
from lokr_trainer.config.__main__ import main as config_main
from lokr_trainer.config.kohya import IGNORED, NOTE, UNSUPPORTED, convert, convert_files, flatten_args, read_toml
from lokr_trainer.errors import ConfigError
from lokr_trainer.lokr.names import sdxl_module_table
from lokr_trainer.lokr.targets import LoKrConfig

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "from_kohya"
ARGS = EXAMPLE / "kohaku_xl_delta_args.toml"
DELTA = REPO / "configs" / "kohaku_xl_delta.toml"

#: The keys the Delta example sets on purpose without a lokr_trainer counterpart, and the ones it sets
#: that change nothing here; the converter must name exactly these.
DELTA_UNSUPPORTED = {"scale_weight_norms", "sample_every_n_steps", "sample_sampler", "sample_prompts"}
DELTA_IGNORED = {
    "network_dim", "network_alpha", "cache_latents_to_disk", "persistent_data_loader_workers", "save_state",
    "xformers", "logging_dir", "log_with",
}
DELTA_NOTES = {"output_name"}


def run(*argv: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = config_main(["from-kohya", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def normalised(cfg_path: Path) -> dict:
    d = load_config(cfg_path).to_dict()
    d["model"]["path"] = "<model>"
    d["data"]["path"] = ["<data>"]
    d["train"]["output_dir"] = "<out>"
    return d


def copy_example(dst: Path) -> Path:
    for f in EXAMPLE.iterdir():
        shutil.copy(f, dst / f.name)
    return dst / ARGS.name


# ----------------------------------------------------------------------------- the Delta reproduction


def test_delta_kohya_config_gives_the_delta_run_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run.toml"
    code, stdout, err = run(ARGS, "--num-processes", 2, "-o", out, capsys=capsys)
    assert (code, err) == (0, "")
    # every value of configs/kohaku_xl_delta.toml, once paths are normalised (no exception needed:
    # kohya's image_dir is a folder, the config's data.path a manifest, hence the normalisation)
    assert normalised(out) == normalised(DELTA)
    written = tomllib.loads(out.read_text())
    assert written["lokr"] == {"preset": "kohaku-xl-delta"}
    assert written["train"]["global_batch"] == 128 and written["train"]["batch_size"] == 4
    assert (written["model"]["path"], written["train"]["output_dir"]) == (
        "kohaku-xl-delta-base.safetensors", "runs/kohaku-xl-delta")
    assert "global_batch" in stdout and "= 128" in stdout


def test_delta_report_names_exactly_the_unmapped_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    conv = convert_files(ARGS, num_processes=2)
    assert conv.keys(UNSUPPORTED) == DELTA_UNSUPPORTED
    assert conv.keys(IGNORED) == DELTA_IGNORED
    assert conv.keys(NOTE) == DELTA_NOTES
    out = tmp_path / "run.toml"
    code, stdout, _ = run(ARGS, "--num-processes", 2, "-o", out, capsys=capsys)
    assert code == 0
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    for key in DELTA_UNSUPPORTED | DELTA_IGNORED | DELTA_NOTES:
        assert any(line.startswith(f"#   {key} ") for line in header), key  # in the file, by name
        assert f"  {key} " in stdout  # and printed
    assert "scale_weight_norms = 1.0: max-norm regularisation is not implemented" in stdout


@pytest.mark.parametrize("n", [1, 2, 4])
def test_global_batch_is_batch_times_accumulation_times_processes(n: int) -> None:
    conv = convert_files(ARGS, num_processes=n)
    assert conv.config["train"]["global_batch"] == 4 * 16 * n
    assert f"x {n} process(es)" in conv.batch_line


def test_flat_and_sectioned_args_convert_equally(tmp_path: Path) -> None:
    args = copy_example(tmp_path)
    flat = tmp_path / "flat.toml"
    flat.write_text(tomli_w.dumps(flatten_args(read_toml(args, "args"))))
    sectioned, flattened = convert_files(args, num_processes=2), convert_files(flat, num_processes=2)
    assert sectioned.config == flattened.config
    assert sectioned.findings == flattened.findings
    assert any(isinstance(v, dict) for v in tomllib.loads(args.read_text()).values())  # it really had sections
    assert not any(isinstance(v, dict) for v in tomllib.loads(flat.read_text()).values())


def test_conflicting_duplicate_keys_in_sections_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="seed is set twice"):
        flatten_args({"a": {"seed": 1}, "b": {"seed": 2}})
    assert flatten_args({"a": {"seed": 1}, "seed": 1}) == {"seed": 1}


# ----------------------------------------------------------------------------- refusals and errors


def _args(tmp_path: Path, **over) -> Path:
    base = {
        "pretrained_model_name_or_path": "base.safetensors",
        "train_data_dir": str(tmp_path / "imgs"),
        "resolution": "1024,1024",
        "network_module": "lycoris.kohya",
        "network_args": ["algo=lokr", "factor=8", "full_matrix=True"],
        "max_train_steps": 10,
    }
    base.update(over)
    base = {k: v for k, v in base.items() if v is not None}
    p = tmp_path / "args.toml"
    p.write_text(tomli_w.dumps(base))
    return p


@pytest.mark.parametrize(
    "over, message",
    [
        ({"network_module": "networks.lora"}, "network_module = \"networks.lora\": lokr_trainer trains LyCORIS LoKr only"),
        ({"network_module": None}, "network_module is missing"),
        ({"network_args": ["algo=loha"]}, "algo = 'loha': lokr_trainer trains LoKr only"),
        ({"network_args": ["factor=8"]}, "algo = 'lora'"),
    ],
)
def test_non_lokr_networks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture, over: dict, message: str) -> None:
    code, out, err = run(_args(tmp_path, **over), "-o", tmp_path / "run.toml", capsys=capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "run.toml").exists()


def test_a_preset_giving_another_algo_to_some_modules_is_refused(tmp_path: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text('[module_algo_map.CrossAttention]\nalgo = "lora"\n')
    with pytest.raises(ConfigError, match="gives algo = 'lora' to lora_unet_.*attn1_to_q"):
        convert_files(_args(tmp_path), preset_path=preset)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.toml", "kohya config file not found"),
        (lambda d: (d / "bad.toml").write_text("seed = = 1") and d / "bad.toml", "is not valid TOML"),
        (lambda d: (d / "bin.toml").write_bytes(b"\xff\xfe\x00") and d / "bin.toml", "not "),
        (lambda d: d, "is a folder"),
        (lambda d: _args(d, train_batch_size="four"), "train_batch_size = \"four\": expected an integer"),
        (lambda d: _args(d, gradient_checkpointing=1), "gradient_checkpointing = 1: expected true or false"),
        (lambda d: _args(d, mixed_precision="fp8"), "mixed_precision = \"fp8\""),
        (lambda d: _args(d, optimizer_args=["betas=0.9"]), "optimizer_args betas = 0.9: expected two numbers"),
        (lambda d: _args(d, network_args="algo"), 'expected "key=value" strings'),
        (lambda d: _args(d, dataset_config="nowhere.toml", train_data_dir=None), "kohya dataset config not found"),
        (lambda d: _args(d, resolution=None), "resolution is missing"),
        (lambda d: _args(d, pretrained_model_name_or_path=None), "pretrained_model_name_or_path is missing"),
        (lambda d: _args(d, network_args=["algo=lokr", "preset=nope"]), "neither a LyCORIS builtin preset"),
    ],
)
def test_bad_inputs_are_one_line_errors_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, make, message: str
) -> None:
    path = make(tmp_path)
    code, out, err = run(path, "-o", tmp_path / "out" / "run.toml", capsys=capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not (tmp_path / "out" / "run.toml").exists()


@pytest.mark.parametrize("argv, message", [((), "the following arguments are required"),
                                           (("--num-processes", "0"), "--num-processes must be a positive integer"),
                                           (("--bogus",), "unrecognized arguments")])
def test_bad_command_lines_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    code, _, err = run(ARGS, *argv, *(() if not argv else ("-o", tmp_path / "r.toml")), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_no_overwrite_without_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run.toml"
    out.write_text("keep me")
    code, _, err = run(ARGS, "-o", out, capsys=capsys)
    assert code == 2 and "exists; pass --overwrite" in err and err.count("\n") == 1
    assert out.read_text() == "keep me"
    code, _, err = run(ARGS, "-o", out, "--overwrite", capsys=capsys)
    assert (code, err) == (0, "")
    assert load_config(out).train.global_batch == 64  # 4 x 16 x 1 process
    assert [p.name for p in tmp_path.iterdir()] == ["run.toml"]  # no temp file left


# ----------------------------------------------------------------------------- mapping details


def _ds(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ds.toml"
    p.write_text(text)
    return p


def test_dataset_levels_cascade_and_conflicts_are_reported(tmp_path: Path) -> None:
    ds = _ds(tmp_path, """
[general]
shuffle_caption = true
caption_extension = ".txt"
resolution = [832, 1216]
enable_bucket = true
max_bucket_reso = 2048
color_aug = false
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 1
  [[datasets.subsets]]
  image_dir = "b"
  keep_tokens = 2
  flip_aug = true
  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
""")
    conv = convert_files(_args(tmp_path, train_data_dir=None, resolution=None, train_batch_size=8), dataset_path=ds)
    d, c = conv.config["data"], conv.config["caption"]
    assert d["path"] == ["a", "b"]
    assert (d["resolution"], d["min_bucket"], d["max_bucket"], d["bucket_step"]) == (1024, 256, 2048, 64)
    assert conv.config["train"]["batch_size"] == 2  # the dataset's, not train_batch_size
    assert c["shuffle_general"] is True and d["keep_tokens"] == 1 and d["flip_prob"] == 0.0
    notes = {f.key: f.reason for f in conv.findings if f.status == NOTE}
    assert "datasets[0].subsets[0].keep_tokens = 1, datasets[0].subsets[1].keep_tokens = 2" in notes["keep_tokens"]
    assert "datasets[0].subsets[1].flip_aug" in notes["flip_aug"]
    assert "data.resolution = 1024" in notes["resolution"]
    assert conv.keys(UNSUPPORTED) == {"datasets[0].subsets[2].is_reg"}
    assert "general.color_aug" in conv.keys(IGNORED)


def test_repeats_scale_epochs_or_are_reported(tmp_path: Path) -> None:
    same = _ds(tmp_path, '[general]\nresolution = 1024\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
               "  num_repeats = 3\n  [[datasets.subsets]]\n  image_dir = \"b\"\n  num_repeats = 3\n")
    conv = convert_files(_args(tmp_path, train_data_dir=None, max_train_steps=None, max_train_epochs=2),
                         dataset_path=same)
    assert conv.config["train"]["epochs"] == 6 and "max_steps" not in conv.config["train"]
    assert "num_repeats" in conv.keys(NOTE)
    mixed = _ds(tmp_path, '[general]\nresolution = 1024\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
                "  num_repeats = 1\n  [[datasets.subsets]]\n  image_dir = \"b\"\n  num_repeats = 5\n")
    conv = convert_files(_args(tmp_path, train_data_dir=None, max_train_steps=None, max_train_epochs=2),
                         dataset_path=mixed)
    assert conv.config["train"]["epochs"] == 2 and "num_repeats" in conv.keys(UNSUPPORTED)


def test_dreambooth_folder_repeats_are_read(tmp_path: Path) -> None:
    for name in ("4_girl", "4_boy"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
    conv = convert_files(_args(tmp_path, max_train_steps=None, max_train_epochs=3))
    assert conv.config["train"]["epochs"] == 12
    assert conv.config["data"]["path"] == [str(tmp_path / "imgs")]


def test_training_settings_map(tmp_path: Path) -> None:
    conv = convert(
        {
            "pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "resolution": 768,
            "network_module": "lycoris.kohya", "network_args": ["algo=lokr", "full_matrix=true", "bypass_mode=True",
                                                                "module_dropout=0.1", "rs_lora=True"],
            "network_train_unet_only": True, "optimizer_type": "AdamW8bit",
            "optimizer_args": ["weight_decay=0.05", "eps=1e-6", "decouple=True"], "learning_rate": 1e-4,
            "text_encoder_lr": [3e-5, 2e-5], "lr_scheduler": "cosine", "lr_warmup_steps": 0.1,
            "max_train_steps": 1000, "v_parameterization": True, "zero_terminal_snr": True,
            "debiased_estimation_loss": True, "ip_noise_gamma": 0.05, "noise_offset": 0.0357,
            "multires_noise_iterations": 6, "min_timestep": 100, "max_timestep": 900, "max_token_length": 225,
            "caption_dropout_rate": 0.05, "caption_tag_dropout_rate": 0.2, "mixed_precision": "bf16",
            "save_precision": "bf16", "cache_text_encoder_outputs": True, "seed": 7, "max_grad_norm": 0.0,
            "gradient_accumulation_steps": 2, "train_batch_size": 3, "save_every_n_steps": 100,
            "save_last_n_steps": 300, "huber_c": 0.1, "color_aug": True,
        },
        num_processes=4,
    )
    c = conv.config
    assert c["model"] == {"path": "m.safetensors", "dtype": "bf16", "vae_dtype": "bf16"}
    assert c["lokr"]["components"] == ["unet"] and c["lokr"]["forward_mode"] == "bypass"
    assert c["lokr"]["module_dropout"] == 0.1 and c["train"]["train_text_encoders"] is False
    assert c["optimizer"] == {"name": "adamw8bit", "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-6,
                              "unet_lr": 1e-4, "te1_lr": 3e-5, "te2_lr": 2e-5, "max_grad_norm": 0.0}
    assert c["scheduler"] == {"name": "cosine", "warmup_steps": 100}
    assert c["diffusion"] == {"prediction": "v_prediction", "min_snr_gamma": 0.0, "debiased_estimation": True,
                              "ip_noise_gamma": 0.05, "noise_offset": 0.0357, "multires_noise_iterations": 6,
                              "multires_noise_discount": 0.3, "zero_terminal_snr": True, "min_timestep": 100,
                              "max_timestep": 900}
    assert c["data"]["max_tokens"] == 225 and c["data"]["cache_text"] is True
    assert (c["data"]["min_bucket"], c["data"]["max_bucket"]) == (768, 768)  # enable_bucket off: one bucket
    assert c["caption"] == {"shuffle_general": False, "tag_dropout": 0.2, "caption_dropout": 0.05}
    t = c["train"]
    assert (t["batch_size"], t["global_batch"], t["seed"], t["save_dtype"], t["keep_last"]) == (3, 24, 7, "bf16", 3)
    assert conv.keys(UNSUPPORTED) == {"network_args.rs_lora", "optimizer_args.decouple", "color_aug"}
    assert {"huber_c", "text_encoder_lr"} <= conv.keys(IGNORED)
    assert {"lr_warmup_steps", "caption_extension", "enable_bucket"} <= conv.keys(NOTE)


def test_unknown_optimizer_and_scheduler_are_reported_not_dropped() -> None:
    conv = convert({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "resolution": 1024,
                    "network_module": "lycoris.kohya", "network_args": ["algo=lokr"], "optimizer_type": "Prodigy",
                    "lr_scheduler": "polynomial", "lr_scheduler_power": 2.0, "some_future_flag": True})
    assert conv.keys(UNSUPPORTED) == {"optimizer_type", "lr_scheduler", "lr_scheduler_power", "some_future_flag"}
    assert conv.config["optimizer"]["name"] == "adamw" and conv.config["scheduler"]["name"] == "constant"


# ----------------------------------------------------------------------------- LoKr selection vs LyCORIS itself

_CLASSES: dict[str, type] = {}


def _module(name: str) -> nn.Module:
    if name not in _CLASSES:
        _CLASSES[name] = type(name, (nn.Module,), {})
    return _CLASSES[name]()


def _container(component: str, prefix: list[str], rest: list[str]) -> str:
    """kohya's SDXL UNet / HF CLIP class of the module at ``prefix``, judged from its children."""
    last = prefix[-1]
    if component != "unet":
        if len(prefix) >= 2 and prefix[-2] == "layers":
            return "CLIPEncoderLayer"
        return {"text_model": "CLIPTextTransformer", "encoder": "CLIPEncoder", "self_attn": "CLIPSdpaAttention",
                "mlp": "CLIPMLP"}.get(last, "ModuleList")
    if last in ("attn1", "attn2"):
        return "CrossAttention"
    if last == "ff":
        return "FeedForward"
    if prefix[-2:] == ["net", "0"]:
        return "GEGLU"
    if len(prefix) >= 2 and prefix[-2] == "transformer_blocks":
        return "BasicTransformerBlock"
    if rest[0] in ("proj_in", "proj_out", "transformer_blocks"):
        return "Transformer2DModel"
    if rest[0] in ("in_layers", "out_layers", "emb_layers", "skip_connection"):
        return "ResnetBlock2D"
    return {"op": "Downsample2D", "conv": "Upsample2D"}.get(rest[0] if len(rest) == 1 else "", "ModuleList")


@pytest.fixture(scope="module")
def skeleton() -> dict[str, nn.Module]:
    """kohya's SDXL UNet and CLIP module trees (class names + paths), every layer 120 wide (factors 2/4/8/-1 differ)."""
    table = sdxl_module_table()
    roots = {}
    for comp, root_cls in (("unet", "SdxlUNet2DConditionModel"), ("te1", "CLIPTextModel"),
                           ("te2", "CLIPTextModelWithProjection")):
        root = _module(root_cls)
        for e in table.component(comp):
            parts = e.path.split(".")
            node = root
            for i, p in enumerate(parts[:-1]):
                if p not in node._modules:
                    node.add_module(p, _module(_container(comp, parts[: i + 1], parts[i + 1:])))
                node = node._modules[p]
            conv3 = comp == "unet" and (parts[-1] in ("op", "conv") or parts[-2:] in (["in_layers", "2"], ["out_layers", "3"])
                                        or e.path in ("input_blocks.0.0", "out.2"))
            leaf = (nn.Conv2d(120, 120, 3) if conv3 else nn.Conv2d(120, 120, 1) if parts[-1] == "skip_connection"
                    else nn.Linear(120, 120))
            node.add_module(parts[-1], leaf)
        roots[comp] = root
    return roots


def _layout(mod) -> tuple:
    return (tuple(sorted((k, tuple(v.shape)) for k, v in mod.state_dict().items() if k != "alpha")), float(mod.scale))


def _quiet():
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


def _lycoris_layout(skeleton, dim, alpha, network_args: dict, preset_doc: dict | None) -> dict[str, tuple]:
    from lycoris.kohya import LycorisNetworkKohya, create_network

    # lycoris.kohya keeps presets in class attributes; a fresh kohya process starts from these
    LycorisNetworkKohya.apply_preset({"enable_conv": True, "module_algo_map": {}, "name_algo_map": {},
                                      "use_fnmatch": False, "exclude_name": [],
                                      "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D",
                                                             "Upsample2D"],
                                      "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1",
                                                           "time_embedding.linear_2"],
                                      "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
                                      "text_encoder_target_name": []})
    kwargs = dict(network_args)
    if preset_doc is not None:
        kwargs["preset"] = preset_doc["path"]
    te = [] if kwargs.pop("unet_only", False) else [skeleton["te1"], skeleton["te2"]]
    with _quiet():
        net = create_network(1.0, dim, alpha, None, te or None, skeleton["unet"], warn_on_unmatched=False, **kwargs)
    return {m.lora_name: _layout(m) for m in net.unet_loras + net.text_encoder_loras}


def _our_layout(skeleton, lokr_table: dict) -> dict[str, tuple]:
    from lycoris.modules.lokr import LokrModule

    lokr = LoKrConfig.from_dict(lokr_table)
    out = {}
    with _quiet():
        for entry, s in lokr.resolve(sdxl_module_table()):
            org = skeleton[entry.component].get_submodule(entry.path)
            m = LokrModule(entry.lokr_name, org, 1.0, s.dim, s.alpha, use_tucker=s.use_tucker,
                           decompose_both=s.decompose_both, factor=s.factor, weight_decompose=s.weight_decompose,
                           full_matrix=s.full_matrix, unbalanced_factorization=s.unbalanced_factorization)
            out[entry.lokr_name] = _layout(m)
    return out


def _check_against_lycoris(tmp_path, skeleton, args: dict, preset_text: str | None, network_args: dict) -> dict:
    preset_doc = None
    if preset_text is not None:
        p = tmp_path / "preset.toml"
        p.write_text(preset_text)
        preset_doc = {"path": str(p)}
        args = {**args, "network_args": [*args["network_args"], f"preset={p}"]}
    conv = convert({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "resolution": 1024,
                    "network_module": "lycoris.kohya", **args},
                   preset=tomllib.loads(preset_text) if preset_text else None, preset_label="preset")
    lyco = _lycoris_layout(skeleton, args.get("network_dim", 4), args.get("network_alpha", 1.0), network_args,
                           preset_doc)
    ours = _our_layout(skeleton, conv.config["lokr"])
    assert sorted(ours) == sorted(lyco)
    assert {k: v for k, v in ours.items() if v != lyco[k]} == {}
    return conv.config["lokr"]


def test_delta_preset_selects_what_lycoris_creates(tmp_path: Path, skeleton) -> None:
    args = {"network_dim": 100000, "network_alpha": 1, "network_args": ["algo=lokr", "factor=8", "full_matrix=True"]}
    lokr = _check_against_lycoris(tmp_path, skeleton, args, (EXAMPLE / "kohaku_xl_delta_lycoris.toml").read_text(),
                                  {"algo": "lokr", "factor": "8", "full_matrix": "True"})
    assert lokr == {"preset": "kohaku-xl-delta"}
    assert len(LoKrConfig.from_preset("kohaku-xl-delta").resolve(sdxl_module_table())) == 1058


def test_builtin_full_preset_with_ranks_matches_lycoris(tmp_path: Path, skeleton) -> None:
    # LyCORIS' default preset on kohya's LDM UNet misses conv_in, conv_out, time_embed and label_emb
    # (its names are diffusers names): 788 UNet + 264 TE modules (research/lycoris.md §2.5)
    args = {"network_dim": 16, "network_alpha": 8, "network_args": ["algo=lokr", "factor=4", "conv_dim=8",
                                                                     "conv_alpha=2"]}
    lokr = _check_against_lycoris(tmp_path, skeleton, args, None,
                                  {"algo": "lokr", "factor": "4", "conv_dim": "8", "conv_alpha": "2"})
    resolved = LoKrConfig.from_dict(lokr).resolve(sdxl_module_table())
    assert sum(e.component == "unet" for e, _ in resolved) == 788
    assert sum(e.component != "unet" for e, _ in resolved) == 264
    assert {(s.dim, s.alpha) for e, s in resolved if e.kind == "resnet_conv"} == {(8, 2.0)}
    assert {(s.dim, s.alpha) for e, s in resolved if e.kind == "attn"} == {(16, 8.0)}


def test_excludes_nested_maps_and_names_match_lycoris(tmp_path: Path, skeleton) -> None:
    preset = r"""
enable_conv = false
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = ["time_embed\\.[02]"]
exclude_name = ["input_blocks\\.4\\.1\\.transformer_blocks\\.0\\.attn1\\..*", "output_blocks\\.2\\."]
[module_algo_map.BasicTransformerBlock]
factor = 2
[module_algo_map.GEGLU]
factor = -1
full_matrix = false
dim = 8
alpha = 4
[name_algo_map."time_embed.2"]   # a regex ('.' any character); LyCORIS' toml reader mangles escaped keys
factor = 4
"""
    args = {"network_dim": 100000, "network_train_unet_only": True,
            "network_args": ["algo=lokr", "factor=8", "full_matrix=True"]}
    lokr = _check_against_lycoris(tmp_path, skeleton, args, preset,
                                  {"algo": "lokr", "factor": "8", "full_matrix": "True", "unet_only": True})
    assert lokr["components"] == ["unet"] and any("pattern" in r for r in lokr["rules"])


def test_conv_dim_zero_turns_convs_off_as_in_lycoris(tmp_path: Path, skeleton) -> None:
    args = {"network_dim": 8, "network_alpha": 0, "network_args": ["algo=lokr", "factor=-1", "conv_dim=0"]}
    lokr = _check_against_lycoris(tmp_path, skeleton, args, None, {"algo": "lokr", "factor": "-1", "conv_dim": "0"})
    kinds = {e.kind for e, _ in LoKrConfig.from_dict(lokr).resolve(sdxl_module_table())}
    assert "resnet_conv" not in kinds and {"skip", "attn", "te_mlp"} <= kinds  # 1x1 skips use the linear dim



def test_network_weights_becomes_init_lokr(tmp_path: Path) -> None:
    """kohya's "continue from this adapter" is our model.init_lokr; dim_from_weights is named, not dropped."""
    base = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", "resolution": 1024,
            "network_module": "lycoris.kohya", "network_args": ["algo=lokr"]}
    conv = convert({**base, "network_weights": "published_lokr.safetensors", "dim_from_weights": True})
    assert conv.config["model"]["init_lokr"] == "published_lokr.safetensors"
    assert "network_weights" in conv.keys(NOTE) and "dim_from_weights" in conv.keys(UNSUPPORTED)
    plain = convert(base)
    assert "init_lokr" not in plain.config["model"] and "network_weights" not in plain.keys(NOTE)

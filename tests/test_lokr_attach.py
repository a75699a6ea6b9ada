"""attach_lokr on the tiny SDXL: exactness at init, equivalence with merged weights, files, errors."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_lokr_io import reference_delta

from lokr_trainer.errors import ConfigError, WrongModelError
from lokr_trainer.lokr.attach import attach_lokr, attach_lokr_from_file
from lokr_trainer.lokr.io import load_lokr, save_lokr, write_lokr
from lokr_trainer.lokr.names import MODEL_ATTR, live_module_path
from lokr_trainer.lokr.targets import FactorRule, LoKrConfig
from lokr_trainer.safetensors_io import read_header

MODES = ("bypass", "rebuild", "merged", "auto")
FIXED_META = {"modelspec.date": "2024-01-01"}


@pytest.fixture
def models(tiny_models):
    """A private copy of the tiny UNet and text encoders (attach mutates forwards and requires_grad)."""
    return SimpleNamespace(
        unet=copy.deepcopy(tiny_models.unet),
        text_encoder=copy.deepcopy(tiny_models.text_encoder),
        text_encoder_2=copy.deepcopy(tiny_models.text_encoder_2),
    )


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(11)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 500]),
        "ctx": torch.randn(2, 5, 64, generator=g),
        "text_embeds": torch.randn(2, 32, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]]),
        "ids": torch.randint(0, 49408, (2, 9), generator=g),
    }


def run(models, x) -> dict[str, torch.Tensor]:
    """Every output the SDXL conditioning and denoiser use."""
    u = models.unet(
        x["sample"], x["t"], encoder_hidden_states=x["ctx"],
        added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
    ).sample
    te1 = models.text_encoder(x["ids"], output_hidden_states=True)
    te2 = models.text_encoder_2(x["ids"], output_hidden_states=True)
    return {
        "unet": u,
        "te1_penultimate": te1.hidden_states[-2],
        "te1_last": te1.last_hidden_state,
        "te2_penultimate": te2.hidden_states[-2],
        "te2_pooled": te2.text_embeds,
    }


def randomize(net, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


#: every kind of target, with decomposed factors, alpha != dim and Tucker in the mix
MIXED = LoKrConfig(
    targets="full",
    factor=4,
    rules=(
        FactorRule(kind=("attn",), pattern="*attn1*", factor=2),
        FactorRule(kind=("ff",), full_matrix=False, dim=2, alpha=3.0),
        FactorRule(kind=("resnet_conv",), full_matrix=False, dim=2, alpha=1.0, use_tucker=True),
        FactorRule(kind=("skip", "upsample"), full_matrix=False, dim=1, alpha=0.5),
        FactorRule(component=("te2",), kind=("te_mlp",), factor=8, full_matrix=False, dim=2, alpha=4.0, decompose_both=True),
        FactorRule(component=("te1",), factor=-1),
    ),
)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", MODES)
def test_outputs_are_bit_identical_at_initialisation(models, inputs, mode, tiny_models):
    with torch.no_grad():
        want = run(tiny_models, inputs)
    net = attach_lokr(models, LoKrConfig(targets="full", forward_mode=mode))
    with torch.no_grad():
        got = run(models, inputs)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    got_train = run(models, inputs)  # grad-enabled path (training mode choice)
    for k in want:
        assert torch.equal(got_train[k].detach(), want[k]), k
    assert len(net) == 183 + 18 + 18


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_wrapped_model_equals_plain_model_with_merged_file_weights(models, inputs, tmp_path, tiny_models, mode, multiplier):
    net = attach_lokr(models, MIXED)
    kinds = {e.kind for e in net.entries.values()}
    assert {"attn", "ff", "proj", "resnet_conv", "skip", "te_attn", "te_mlp"} <= kinds
    randomize(net, seed=1)
    net.set_forward_mode(mode)
    net.multiplier = multiplier
    path = save_lokr(net, tmp_path / "a.safetensors", dtype=torch.float32)
    file = load_file(str(path))
    tucker = [k for k in file if k.endswith("lokr_t2")]
    lowrank = [k for k in file if k.endswith("lokr_w2_b")]
    assert tucker and lowrank and any(k.endswith("lokr_w1_b") for k in file)

    ref = copy.deepcopy(tiny_models)
    with torch.no_grad():
        for name, entry in net.entries.items():
            tensors = {k.split(".", 1)[1]: v for k, v in file.items() if k.split(".", 1)[0] == name}
            model = getattr(ref, MODEL_ATTR[entry.component])
            weight = model.get_submodule(live_module_path(entry, model, net.table.layout)).weight
            weight += multiplier * reference_delta(tensors, tuple(weight.shape))
        want = run(ref, inputs)
        got = run(models, inputs)
    assert max_diff(got, want) <= 1e-5
    with torch.no_grad(), net.disabled():
        base = run(models, inputs)
    assert max_diff(base, want) > 1e-3  # the adapter really changes every output
    assert all(float((base[k] - want[k]).abs().max()) > 1e-4 for k in want)


def test_lycoris_rebuilds_the_same_delta_from_our_file(models, tmp_path):
    from lycoris.functional.lokr import kron_weight
    from lycoris.modules.lokr import LokrModule

    net = attach_lokr(models, MIXED)
    randomize(net, seed=2)
    f = load_lokr(save_lokr(net, tmp_path / "a.safetensors", dtype=torch.float32), layout=net.table.layout, table=net.table)
    checked = 0
    with torch.no_grad():
        for name, module in f.modules.items():
            org = net._targets[name]
            ours = module.delta_weight(tuple(org.weight.shape))
            if module.tucker:
                # LyCORIS' loader cannot rebuild Tucker modules (research §2.1); its functional kron can
                t = module.tensors
                theirs = kron_weight(t["lokr_w1"], None, None, None, t["lokr_w2_a"], t["lokr_w2_b"], t["lokr_t2"], scale=module.scale)
            else:
                w = [module.tensors.get(k) for k in LokrModule.weight_list]
                lyco = LokrModule.make_module_from_state_dict(name, org, *w)
                theirs = lyco.get_weight(lyco.shape)  # scale applied once (never get_diff_weight)
            assert torch.allclose(theirs.reshape(ours.shape), ours, atol=1e-6, rtol=1e-5), name
            checked += 1
    assert checked == len(net) == len(f.modules)


@pytest.mark.parametrize("config", [MIXED, LoKrConfig.from_preset("kohaku-xl-delta")], ids=["mixed", "delta"])
def test_every_forward_mode_gives_the_same_outputs_and_gradients(models, inputs, config):
    net = attach_lokr(models, config)
    randomize(net, seed=3)
    results = {}
    for mode in ("bypass", "rebuild", "merged"):
        net.set_forward_mode(mode)
        net.zero_grad(set_to_none=True)
        out = run(models, inputs)
        loss = sum((v.float() ** 2).mean() for v in out.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        results[mode] = ({k: v.detach() for k, v in out.items()}, grads)
    ref_out, ref_grads = results["rebuild"]
    # relative to the largest value: some tiny-model gradients are exactly zero in exact
    # arithmetic (a per-channel time shift before a one-channel-per-group GroupNorm) and
    # only carry rounding noise, so an element-wise relative test would compare noise
    gmax = max(float(g.abs().max()) for g in ref_grads.values())
    for mode in ("bypass", "merged"):
        out, grads = results[mode]
        for k in ref_out:
            assert float((out[k] - ref_out[k]).abs().max()) <= 1e-5 * float(ref_out[k].abs().max()), (mode, k)
        for n in ref_grads:
            assert float((grads[n] - ref_grads[n]).abs().max()) <= 1e-5 * gmax, (mode, n)
    live = sum(float(g.abs().max()) > 1e-4 * gmax for g in ref_grads.values())
    assert live >= 0.8 * len(ref_grads)


# --------------------------------------------------------------------------- parameters


def test_only_adapter_parameters_require_grad_and_counts_match_summary(models, inputs):
    net = attach_lokr(models, LoKrConfig.from_preset("kohaku-xl-delta"))
    for attr in ("unet", "text_encoder", "text_encoder_2"):
        assert not any(p.requires_grad for p in getattr(models, attr).parameters())
    trainable = [p for p in net.parameters() if p.requires_grad]
    s = net.summary()
    assert s.parameters == sum(p.numel() for p in trainable) > 0
    for comp in ("unet", "te1", "te2"):
        assert s.component(comp).parameters == sum(p.numel() for p in net.component_parameters(comp))
        assert s.component(comp).modules == len(net.names(comp))
    randomize(net, seed=4)
    loss = sum(v.float().pow(2).mean() for v in run(models, inputs).values())
    loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in models.unet.parameters())
    text = str(s)
    assert "f2 full" in text and "te2" in text and "total" in text


def test_summary_file_size_is_the_saved_size(models, tmp_path):
    net = attach_lokr(models, MIXED)
    for dtype in (torch.float16, torch.float32):
        path = save_lokr(net, tmp_path / f"x{dtype}.safetensors", dtype=dtype)
        assert net.summary(dtype).file_bytes == path.stat().st_size


def test_param_groups_have_one_learning_rate_per_component(models):
    net = attach_lokr(models, LoKrConfig())
    groups = net.param_groups(unet_lr=4e-5, te1_lr=1e-5, te2_lr=2e-5, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("unet", 4e-5, 0.1),
        ("te1", 1e-5, 0.1),
        ("te2", 2e-5, 0.1),
    ]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    assert set().union(*ids) == {id(p) for p in net.parameters()}
    assert [g["lr"] for g in net.param_groups(1e-4, te2_lr=1e-6)] == [1e-4, 1e-4, 1e-6]
    with pytest.raises(ConfigError, match="te1"):
        net.param_groups(unet_lr=1e-4)
    net.remove()
    unet_only = attach_lokr(models, LoKrConfig(components=("unet",)))
    assert [g["name"] for g in unet_only.param_groups(1e-4)] == ["unet"]


# --------------------------------------------------------------------------- multiplier, enable, merge


def test_disable_gives_the_base_bit_for_bit_and_enable_restores(models, inputs, tiny_models):
    with torch.no_grad():
        base = run(tiny_models, inputs)
    net = attach_lokr(models, MIXED)
    randomize(net, seed=5)
    with torch.no_grad():
        on = run(models, inputs)
        net.disable()
        off = run(models, inputs)
        net.enable()
        again = run(models, inputs)
        net.multiplier = 0.0
        zero = run(models, inputs)
    assert all(torch.equal(off[k], base[k]) for k in base)
    assert all(torch.equal(again[k], on[k]) for k in on)
    assert max_diff(zero, base) <= 1e-5 and max_diff(on, base) > 1e-3


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_merge_into_models_bakes_the_wrapped_outputs(models, inputs, multiplier):
    net = attach_lokr(models, MIXED)
    randomize(net, seed=6)
    net.multiplier = multiplier
    with torch.no_grad():
        wrapped = run(models, inputs)
        net.merge_into_models()
        merged = run(models, inputs)
    assert max_diff(merged, wrapped) <= 1e-5
    assert all("forward" not in m.__dict__ for m in net._targets.values())
    with pytest.raises(ConfigError, match="merged"):
        net.enable()


def test_dokr_wrapped_equals_lycoris_magnitude_formula(models, inputs, tmp_path, tiny_models):
    cfg = LoKrConfig(targets="attn", factor=4, weight_decompose=True)
    net = attach_lokr(models, cfg)
    randomize(net, seed=7)
    assert set(net.forward_modes().values()) <= {"merged", "rebuild"}
    with pytest.raises(ConfigError, match="bypass"):
        net.set_forward_mode("bypass")
    net.multiplier = 0.5
    f = load_lokr(save_lokr(net, tmp_path / "d.safetensors", dtype=torch.float32), layout=net.table.layout, table=net.table)
    ref = copy.deepcopy(tiny_models)
    with torch.no_grad():
        for name, module in f.modules.items():
            entry = net.entries[name]
            model = getattr(ref, MODEL_ATTR[entry.component])
            w = model.get_submodule(live_module_path(entry, model, net.table.layout)).weight
            w.copy_(module.apply_to_weight(w, 0.5))
        want = run(ref, inputs)
        got = {}
        for mode in ("rebuild", "merged"):
            net.set_forward_mode(mode)
            got[mode] = run(models, inputs)
    assert max_diff(got["rebuild"], want) <= 1e-5 and max_diff(got["merged"], want) <= 1e-5


def test_attaching_twice_is_an_error_until_removed(models, inputs, tiny_models):
    net = attach_lokr(models, LoKrConfig(targets="attn"))
    with pytest.raises(ConfigError, match="already has a LoKr"):
        attach_lokr(models, LoKrConfig(targets="attn"))
    net.remove()
    again = attach_lokr(models, LoKrConfig(targets="attn"))
    randomize(again, seed=13)
    again.remove()
    with torch.no_grad():
        assert torch.equal(run(models, inputs)["unet"], run(tiny_models, inputs)["unet"])


def test_dropouts_follow_the_wrapped_models_train_eval_state(models, inputs, capsys):
    net = attach_lokr(models, LoKrConfig(targets="attn-mlp", module_dropout=0.95, dropout=0.5))
    assert "haven't implemented" not in capsys.readouterr().out
    randomize(net, seed=14)
    for attr in ("unet", "text_encoder", "text_encoder_2"):
        getattr(models, attr).eval()
    with torch.no_grad():
        evaluated = run(models, inputs)
        for lyco in net.lokr.values():
            lyco.module_dropout = 0.0
            lyco.drop = torch.nn.Identity()
        reference = run(models, inputs)
        for lyco in net.lokr.values():
            lyco.module_dropout = 0.95
        models.unet.train()
        torch.manual_seed(0)
        trained = run(models, inputs)
    assert all(torch.equal(evaluated[k], reference[k]) for k in reference)
    assert float((trained["unet"] - reference["unet"]).abs().max()) > 1e-4


def test_dropout_settings_pin_the_forward_mode(models):
    net = attach_lokr(models, LoKrConfig(targets="attn", dropout=0.1))
    assert set(net.forward_modes().values()) == {"bypass"}
    with pytest.raises(ConfigError, match="dropout"):
        attach_lokr(models, LoKrConfig(targets="attn", rank_dropout=0.1, forward_mode="bypass"))


# --------------------------------------------------------------------------- files


def test_save_load_save_is_identical(models, tiny_models, tmp_path):
    cfg = LoKrConfig.from_preset("kohaku-xl-delta")
    net = attach_lokr(models, cfg)
    randomize(net, seed=8)
    p1 = save_lokr(net, tmp_path / "1.safetensors", metadata={**FIXED_META, "lokr_trainer.step": "100"})
    meta = read_header(p1).metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert LoKrConfig.from_dict(json.loads(meta["lokr_trainer.lokr_config"])) == cfg

    # transformers 5's CLIPTextModel has no text_model level; the file names keep it (UIs need it)
    assert not hasattr(models.text_encoder, "text_model")
    te1_names = {k.split(".")[0] for k in load_file(str(p1)) if k.startswith("lora_te1_")}
    assert len(te1_names) == 18 and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in te1_names)

    fresh = SimpleNamespace(**{a: copy.deepcopy(getattr(tiny_models, a)) for a in ("unet", "text_encoder", "text_encoder_2")})
    net2 = attach_lokr(fresh, cfg)
    assert len(net2.load_state(p1)) == len(net)
    p2 = save_lokr(net2, tmp_path / "2.safetensors")
    assert p2.read_bytes() == p1.read_bytes()

    fresh3 = SimpleNamespace(**{a: copy.deepcopy(getattr(tiny_models, a)) for a in ("unet", "text_encoder", "text_encoder_2")})
    net3 = attach_lokr_from_file(fresh3, p1)
    assert net3.config == cfg
    p3 = save_lokr(net3, tmp_path / "3.safetensors")
    assert p3.read_bytes() == p1.read_bytes()


def test_loading_into_a_network_with_other_shapes_names_the_modules(models, tiny_models, tmp_path):
    net = attach_lokr(models, LoKrConfig(targets="attn-mlp", factor=4))
    randomize(net, seed=9)
    path = save_lokr(net, tmp_path / "f4.safetensors")
    fresh = SimpleNamespace(**{a: copy.deepcopy(getattr(tiny_models, a)) for a in ("unet", "text_encoder", "text_encoder_2")})
    other = attach_lokr(fresh, LoKrConfig(targets="attn-mlp", factor=4, rules=(FactorRule(kind=("ff",), factor=2),)))
    with pytest.raises(WrongModelError) as e:
        other.load_state(path)
    assert "ff_net_0_proj" in str(e.value) and "strict=False" in str(e.value)
    loaded = other.load_state(path, strict=False)
    assert len(loaded) == len(other) - sum(1 for x in other.entries.values() if x.kind == "ff")


def test_file_naming_modules_the_model_lacks_is_an_error_unless_skipped(models, tmp_path, caplog):
    net = attach_lokr(models, LoKrConfig(targets="attn"))
    randomize(net, seed=10)
    tensors = net.file_tensors()
    # a full-size SDXL module (level 2 of SDXL) the tiny UNet does not have
    extra = "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q"
    write_lokr(tmp_path / "x.safetensors", {**tensors, extra: next(iter(tensors.values()))}, {})
    with pytest.raises(WrongModelError, match=extra):
        net.load_state(tmp_path / "x.safetensors")
    with pytest.raises(WrongModelError, match=extra):
        attach_lokr_from_file(models, tmp_path / "x.safetensors")
    with caplog.at_level(logging.WARNING):
        assert len(net.load_state(tmp_path / "x.safetensors", strict=False)) == len(net)
    assert extra in caplog.text


def test_reads_a_file_lycoris_wrote_and_computes_what_lycoris_computes(tiny_models, inputs, tmp_path):
    """LyCORIS' own network on diffusers/transformers-5 modules (lycoris_ UNet names, TE1 names without
    text_model): we load its file by name mapping and reproduce its forward."""
    from lycoris import create_lycoris
    from lycoris.wrapper import LycorisNetwork

    theirs = SimpleNamespace(**{a: copy.deepcopy(getattr(tiny_models, a)) for a in ("unet", "text_encoder", "text_encoder_2")})
    ours = SimpleNamespace(**{a: copy.deepcopy(getattr(tiny_models, a)) for a in ("unet", "text_encoder", "text_encoder_2")})
    sd = {}
    nets = []
    old_prefix = LycorisNetwork.LORA_PREFIX
    try:
        for prefix, attr, target in (("lycoris", "unet", None), ("lora_te1", "text_encoder", None)):
            LycorisNetwork.LORA_PREFIX = prefix
            lyco_net = create_lycoris(getattr(theirs, attr), 1.0, linear_dim=100000, linear_alpha=1, algo="lokr", factor=4, full_matrix=True)
            lyco_net.apply_to()
            randomize(lyco_net, seed=12)
            nets.append(lyco_net)
            sd.update({k: v.detach().clone() for k, v in lyco_net.state_dict().items()})
    finally:
        LycorisNetwork.LORA_PREFIX = old_prefix
    assert any(k.startswith("lycoris_down_blocks_") for k in sd) and any(k.startswith("lora_te1_encoder_layers_") for k in sd)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "lyco.safetensors"))
    net = attach_lokr_from_file(ours, tmp_path / "lyco.safetensors")
    assert len(net.names("te2")) == 0 and len(net.names("te1")) == 18
    with torch.no_grad():
        want = run(theirs, inputs)
        got = run(ours, inputs)
        base = run(tiny_models, inputs)
    for k in ("unet", "te1_penultimate", "te1_last"):
        assert torch.allclose(got[k], want[k], atol=1e-5), k
        assert float((got[k] - base[k]).abs().max()) > 1e-3, k


# --------------------------------------------------------------------------- configuration


def test_selection_that_leaves_an_enabled_component_empty_is_an_error(models):
    with pytest.raises(ConfigError, match="te1"):
        attach_lokr(models, LoKrConfig(targets="attn", exclude=("te1.*",)))
    with pytest.raises(ConfigError, match="unet"):
        attach_lokr(models, LoKrConfig(rules=(FactorRule(component=("unet",), skip=True),)))
    net = attach_lokr(models, LoKrConfig(components=("unet", "te2"), targets="attn"))
    assert net.names("te1") == [] and net.names("te2")


def test_partial_text_encoder_attention_is_an_error(models):
    with pytest.raises(ConfigError, match="q, k, v and out"):
        attach_lokr(models, LoKrConfig(targets="attn", exclude=("*te2*self_attn_q_proj",)))


def test_rules_first_match_and_every_name_spelling(models):
    cfg = LoKrConfig(
        targets="attn",
        include=("unet.down_blocks.1.attentions.0.proj_in",),  # diffusers spelling
        factor=8,
        rules=(
            FactorRule(pattern="lora_unet_input_blocks_4_1_*", factor=2),  # file spelling
            FactorRule(pattern="unet.input_blocks.4.*", factor=4),  # never reached for block 4.1
            FactorRule(kind=("te_attn",), component=("te2",), factor=4),
        ),
    )
    net = attach_lokr(models, cfg)
    s = net.settings
    assert s["lora_unet_input_blocks_4_1_proj_in"].factor == 2 and s["lora_unet_input_blocks_4_1_proj_in"].rule == 0
    assert s["lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q"].factor == 8
    assert s["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"].factor == 4
    assert s["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].factor == 8
    assert "lora_unet_input_blocks_5_1_proj_in" not in s


def test_config_from_toml_table_and_preset_overrides():
    cfg = LoKrConfig.from_dict(
        {"preset": "kohaku-xl-delta", "multiplier": 0.8, "components": ["unet", "te1"]}
    )
    assert cfg.preset == "kohaku-xl-delta" and cfg.multiplier == 0.8 and cfg.components == ("unet", "te1")
    assert cfg.full_matrix and {r.factor for r in cfg.rules} | {cfg.factor} == {2, 4, 8}
    table = LoKrConfig.from_dict({"targets": "attn", "rules": [{"kind": ["attn"], "factor": 2}]})
    assert table.rules[0].factor == 2
    assert LoKrConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad in ({"factr": 4}, {"targets": "everything"}, {"rules": [{"factor": 2}]}, {"rules": [{"kind": "attention"}]},
                {"components": ["te3"]}, {"factor": 0}, {"forward_mode": "fast"}):
        with pytest.raises(ConfigError):
            LoKrConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="preset"):
        LoKrConfig.from_preset("kohaku-xl-omega")

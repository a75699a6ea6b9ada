"""Full-size SDXL on the meta device: the kohaku-xl-delta file against a real SDXL single file's keys."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lokr_trainer.lokr.attach import attach_lokr
from lokr_trainer.lokr.io import LoKrModuleWeights
from lokr_trainer.lokr.names import lokr_name_to_sdxl_key, sdxl_module_table
from lokr_trainer.lokr.targets import LoKrConfig
from lokr_trainer.sdxl.load import build_empty, infer_configs
from lokr_trainer.sdxl.reference import sdxl_base_keys


@pytest.fixture(scope="module")
def sdxl_meta():
    shapes = {k: v[0] for k, v in sdxl_base_keys().items()}
    configs = infer_configs(shapes)
    return SimpleNamespace(**{c: build_empty(c, configs[c]) for c in ("unet", "text_encoder", "text_encoder_2")})


@pytest.fixture(scope="module")
def delta_network(sdxl_meta):
    return attach_lokr(sdxl_meta, LoKrConfig.from_preset("kohaku-xl-delta"))


def test_kohaku_delta_names_map_to_exactly_one_real_weight_each(delta_network):
    keys = sdxl_base_keys()
    net = delta_network
    assert next(net.parameters()).device.type == "meta"
    seen: dict[tuple[str, int | None], str] = {}
    tensors = net.file_tensors()
    for name, t in tensors.items():
        key, idx = lokr_name_to_sdxl_key(name)
        assert key in keys, name
        assert (key, idx) not in seen, (name, seen.get((key, idx)))
        seen[(key, idx)] = name
        shape = keys[key][0]
        if idx is not None:
            shape = (shape[0] // 3, *shape[1:])
        assert LoKrModuleWeights(name, dict(t)).fits(shape), (name, shape)
        assert t["alpha"].dtype == torch.float32 and t["alpha"].shape == ()
    counts = {c: len(net.names(c)) for c in ("unet", "te1", "te2")}
    assert counts == {"unet": 794, "te1": 72, "te2": 192}  # every Linear/Conv, all TE attention + MLP
    assert set(tensors) == {e.lokr_name for e in sdxl_module_table().entries}
    # bigG: q, k, v land on rows 0/1/2 of in_proj_weight, all four attention parts present per layer
    in_proj = [k for k in seen if k[1] is not None]
    assert len(in_proj) == 32 * 3


def test_kohaku_delta_is_full_matrix_factor_2_to_8_and_under_800_mb(delta_network):
    net = delta_network
    factors = {s.factor for s in net.settings.values()}
    assert factors == {2, 4, 8}
    assert all(lyco.use_w1 and lyco.use_w2 and lyco.scale == 1.0 for lyco in net.lokr.values())
    s = net.summary(torch.float16)
    assert s.file_bytes < 800e6
    data = sum(
        sum(math.prod(t.shape) * (4 if k == "alpha" else 2) for k, t in ts.items()) for ts in net.file_tensors().values()
    )
    assert s.file_bytes - s.header_bytes == data
    per_component = {c: s.component(c).bytes for c in ("unet", "te1", "te2")}
    assert sum(per_component.values()) == data
    assert s.parameters == sum(p.numel() for p in net.parameters())

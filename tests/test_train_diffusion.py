"""Diffusion maths: loss weights (hand-computed), schedules and noising vs diffusers, per-sample draws."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from lokr_trainer.errors import ConfigError
from lokr_trainer.sdxl.configs import SDXL_SCHEDULER_CONFIG
from lokr_trainer.train.diffusion import (
    NoiseSchedule,
    add_noise,
    loss_weights,
    make_schedule,
    make_schedule_from_config,
    noisy_input,
    per_sample_mse,
    prediction_target,
    sample_ip_noise,
    sample_noise,
    sample_timestep,
    snr,
)

# ᾱ values exact in float32 (and so is 1 − ᾱ): SNR = 1, 3, 7, 1/7, 2047 (above kohya's 1000 cap).
ALPHAS = torch.tensor([0.5, 0.75, 0.875, 0.125, 1.0 - 2.0**-11], dtype=torch.float32)
T = torch.arange(5)

# Expected weights, computed by hand with plain Python floats (γ = 5).
EPS_MIN_SNR = [1.0, 1.0, 5 / 7, 1.0, 5 / 2047]  # min(SNR, γ)/SNR
V_MIN_SNR = [0.5, 0.75, 0.625, 0.125, 0.00244140625]  # min(SNR, γ)/(SNR+1)
EPS_DEBIASED = [1.0, 0.5773502691896258, 0.3779644730092272, 2.6457513110645907, 0.03162277660168379]
V_DEBIASED = [0.5, 0.25, 0.125, 0.875, 0.000999000999000999]
EPS_BOTH = [1.0, 0.5773502691896258, 0.26997462357801943, 2.6457513110645907, 7.724176014089837e-05]
V_BOTH = [0.25, 0.1875, 0.078125, 0.109375, 2.4389672827172827e-06]


def close(actual: torch.Tensor, expected: list[float], rel: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.tolist() == pytest.approx(expected, rel=rel, abs=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- loss weights -------------------------------------------------------------------------------


def test_snr_hand_values():
    close(snr(T, ALPHAS), [1.0, 3.0, 7.0, 1 / 7, 2047.0])


@pytest.mark.parametrize(
    "prediction, gamma, debiased, expected",
    [
        ("epsilon", 5.0, False, EPS_MIN_SNR),
        ("v_prediction", 5.0, False, V_MIN_SNR),
        ("epsilon", None, True, EPS_DEBIASED),
        ("v_prediction", None, True, V_DEBIASED),
        ("epsilon", 5.0, True, EPS_BOTH),
        ("v_prediction", 5.0, True, V_BOTH),
        ("epsilon", None, False, [1.0] * 5),
        ("v_prediction", 0.0, False, [1.0] * 5),
    ],
)
def test_loss_weights_hand_values(prediction, gamma, debiased, expected):
    w = loss_weights(T, ALPHAS, prediction=prediction, min_snr_gamma=gamma, debiased=debiased)
    close(w, expected)


def test_loss_weights_gather_follows_timesteps():
    w = loss_weights(torch.tensor([2, 2, 0]), ALPHAS, min_snr_gamma=5.0)
    close(w, [5 / 7, 5 / 7, 1.0])


def test_loss_weights_errors():
    with pytest.raises(ConfigError, match="epsilon"):
        loss_weights(T, ALPHAS, prediction="sample")
    with pytest.raises(ConfigError):
        loss_weights(T, ALPHAS, min_snr_gamma=-1.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma, debiased", [(5.0, False), (None, True), (5.0, True)])
def test_ztsnr_weights_finite_at_last_timestep(prediction, gamma, debiased):
    sched = make_schedule(zero_terminal_snr=True)
    t = torch.tensor([0, 500, 999])
    w = loss_weights(t, sched.snr_alphas_cumprod, prediction=prediction, min_snr_gamma=gamma, debiased=debiased)
    assert torch.isfinite(w).all() and (w > 0).all()


def test_eps_min_snr_is_one_at_zero_snr():
    # the rescaled schedule itself has SNR 0 at t=999: min(SNR,γ)/SNR → 1, not 0/0
    sched = make_schedule(zero_terminal_snr=True)
    w = loss_weights(torch.tensor([999]), sched.alphas_cumprod, min_snr_gamma=5.0)
    assert w.tolist() == [1.0]


# -- schedules ---------------------------------------------------------------------------------


def test_schedule_matches_diffusers_and_float64_reference():
    sched = make_schedule()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    assert sched.alphas_cumprod.dtype == torch.float32 and sched.alphas_cumprod.shape == (1000,)
    assert sched.snr_alphas_cumprod is sched.alphas_cumprod
    assert sched.num_train_timesteps == 1000
    # diffusers accumulates the cumprod in float32; we do float64 then round (max diff measured 4.8e-7)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-6)
    torch.testing.assert_close(sched.betas, ref.betas, rtol=0, atol=1e-8)
    # plain-Python float64 reference, rounded to float32 at the end
    a, b, acc, expected = 0.00085**0.5, 0.012**0.5, 1.0, []
    for i in range(1000):
        acc *= 1.0 - (a + (b - a) * i / 999) ** 2
        expected.append(acc)
    torch.testing.assert_close(sched.alphas_cumprod, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)


def test_linear_schedule_matches_diffusers():
    sched = make_schedule(100, 0.0001, 0.02, "linear")
    ref = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=100)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-6)


def test_zero_terminal_snr_matches_diffusers():
    sched = make_schedule(zero_terminal_snr=True)
    plain = make_schedule()
    ref = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    assert sched.alphas_cumprod[-1].item() == 0.0
    assert sched.betas[-1].item() == 1.0
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=1e-6)
    betas64 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sched.betas, rescale_zero_terminal_snr(betas64).float(), rtol=0, atol=1e-6)
    # the first ᾱ is kept, and the SNR weights use the original schedule
    assert sched.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), abs=1e-7)
    assert torch.equal(sched.snr_alphas_cumprod, plain.alphas_cumprod)


def test_schedule_from_config():
    sched = make_schedule_from_config(SDXL_SCHEDULER_CONFIG)
    assert isinstance(sched, NoiseSchedule)
    assert torch.equal(sched.alphas_cumprod, make_schedule().alphas_cumprod)
    z = make_schedule_from_config({**SDXL_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True})
    assert z.alphas_cumprod[-1].item() == 0.0
    z2 = make_schedule_from_config(SDXL_SCHEDULER_CONFIG, zero_terminal_snr=True)
    assert torch.equal(z.alphas_cumprod, z2.alphas_cumprod)
    with pytest.raises(ConfigError, match="beta_schedule"):
        make_schedule_from_config({**SDXL_SCHEDULER_CONFIG, "beta_schedule": "squaredcos_cap_v3"})
    with pytest.raises(ConfigError):
        make_schedule_from_config({**SDXL_SCHEDULER_CONFIG, "beta_end": "high"})


# -- batched maths vs diffusers ------------------------------------------------------------------


@pytest.fixture
def batch():
    g = gen(1)
    x0 = torch.randn(3, 4, 8, 6, generator=g)
    noise = torch.randn(3, 4, 8, 6, generator=g)
    t = torch.tensor([0, 421, 999])
    return x0, noise, t


def test_add_noise_and_velocity_match_diffusers(batch):
    x0, noise, t = batch
    sched = make_schedule()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(
        add_noise(x0, noise, t, sched.alphas_cumprod), ref.add_noise(x0, noise, t), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        prediction_target(x0, noise, t, sched.alphas_cumprod, "v_prediction"),
        ref.get_velocity(x0, noise, t),
        rtol=0,
        atol=1e-6,
    )
    assert torch.equal(prediction_target(x0, noise, t, sched.alphas_cumprod, "epsilon"), noise)
    with pytest.raises(ConfigError):
        prediction_target(x0, noise, t, sched.alphas_cumprod, "sample")


def test_add_noise_is_fp32_for_bf16_input(batch):
    x0, noise, t = batch
    ac = make_schedule().alphas_cumprod
    out = add_noise(x0.bfloat16(), noise.bfloat16(), t, ac)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, add_noise(x0.bfloat16().float(), noise.bfloat16().float(), t, ac))


def test_ip_noise_changes_input_not_target(batch):
    x0, noise, t = batch
    ac = make_schedule().alphas_cumprod
    xi = torch.stack([sample_ip_noise((4, 8, 6), gen(10 + i)) for i in range(3)])
    plain = noisy_input(x0, noise, t, ac)
    assert torch.equal(plain, add_noise(x0, noise, t, ac))
    perturbed = noisy_input(x0, noise, t, ac, ip_noise=xi, ip_noise_gamma=0.1)
    assert not torch.allclose(plain, perturbed)
    torch.testing.assert_close(perturbed, add_noise(x0, noise + 0.1 * xi, t, ac))
    # the target is computed from the unperturbed ε and does not see ξ at all
    for prediction in ("epsilon", "v_prediction"):
        target = prediction_target(x0, noise, t, ac, prediction)
        assert torch.equal(target, prediction_target(x0.clone(), noise.clone(), t, ac, prediction))
    with pytest.raises(ValueError):
        noisy_input(x0, noise, t, ac, ip_noise_gamma=0.1)


def test_per_sample_mse():
    pred = torch.zeros(2, 3, 2, 2, dtype=torch.bfloat16)
    target = torch.ones(2, 3, 2, 2, dtype=torch.bfloat16)
    target[1] *= 3
    loss = per_sample_mse(pred, target)
    assert loss.dtype == torch.float32 and loss.tolist() == [1.0, 9.0]
    with pytest.raises(ValueError):
        per_sample_mse(pred, target[:, :2])


# -- per-sample draws ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"noise_offset": 0.1}, {"multires_iterations": 6, "multires_discount": 0.3}],
)
def test_noise_reproducible_and_independent_of_global_rng(options):
    torch.manual_seed(0)
    a = sample_noise((4, 16, 12), gen(7), **options)
    torch.manual_seed(12345)
    torch.rand(100)
    b = sample_noise((4, 16, 12), gen(7), **options)
    assert a.shape == (4, 16, 12) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_noise((4, 16, 12), gen(8), **options))


def test_draws_do_not_touch_global_rng():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    g = gen(1)
    sample_noise((4, 8, 8), g, noise_offset=0.1, multires_iterations=4)
    sample_ip_noise((4, 8, 8), g)
    sample_timestep(g, 0, 1000)
    assert torch.equal(torch.get_rng_state(), before)


def test_timestep_range_and_reproducibility():
    g = gen(0)
    draws = [sample_timestep(g, 200, 205) for _ in range(500)]
    assert set(draws) == {200, 201, 202, 203, 204}
    torch.manual_seed(1)
    x = sample_timestep(gen(5), 0, 1000)
    torch.manual_seed(2)
    assert sample_timestep(gen(5), 0, 1000) == x
    assert isinstance(x, int)
    with pytest.raises(ConfigError):
        sample_timestep(gen(0), 10, 10)


def test_noise_offset_is_a_per_channel_constant():
    base = sample_noise((4, 8, 8), gen(3))
    offset = sample_noise((4, 8, 8), gen(3), noise_offset=0.1)
    diff = offset - base  # the base draw comes first, so it is shared
    assert not torch.equal(offset, base)
    assert diff.abs().max() > 0
    torch.testing.assert_close(diff, diff[:, :1, :1].expand_as(diff), rtol=0, atol=1e-6)


def test_multires_noise_is_normalised_and_smoother():
    def neighbour_corr(x: torch.Tensor) -> float:
        a, b = x[:, :, :-1].flatten(), x[:, :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    plain = sample_noise((4, 64, 64), gen(4))
    multi = sample_noise((4, 64, 64), gen(4), multires_iterations=8, multires_discount=0.8)
    assert multi.shape == plain.shape
    assert not torch.equal(multi, plain)
    assert multi.std().item() == pytest.approx(1.0, abs=1e-5)
    assert neighbour_corr(multi) > neighbour_corr(plain) + 0.1


def test_multires_tiny_latent_stops_at_one():
    noise = sample_noise((4, 2, 3), gen(0), multires_iterations=10)
    assert noise.shape == (4, 2, 3) and torch.isfinite(noise).all()


def test_generator_must_be_cpu():
    with pytest.raises(TypeError):
        sample_noise((4, 8, 8), 0)  # type: ignore[arg-type]
    assert math.isfinite(float(sample_ip_noise((1, 1, 1), gen(0))))

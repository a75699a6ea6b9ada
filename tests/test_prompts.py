"""Long-prompt encoding: parity with diffusers for one window, window layouts for 300 tokens."""

from __future__ import annotations

import pytest
import torch

from lokr_trainer.data.buckets import Bucket, plan_crop
from lokr_trainer.errors import ConfigError
from lokr_trainer.train.prompts import (
    PromptEncoder,
    encode_prompts,
    make_time_ids,
    sequence_length,
    tokenize_windows,
)

SHORT = [
    "1girl, hatsune miku, vocaloid, masterpiece, newest, long hair, twintails, smile",
    "",
    "a cat sitting on a windowsill in the afternoon sun",
]


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def pipe(models):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2,
        unet=models.unet,
        scheduler=EulerDiscreteScheduler.from_config(models.scheduler_config),
    )


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def long_prompt(tok, at_least: int) -> str:
    words = ["blue sky", "cherry blossoms", "school uniform", "looking at viewer", "wind", "petals", "outdoors"]
    parts: list[str] = []
    i = 0
    while n_tokens(tok, ", ".join(parts)) < at_least:
        parts.append(f"{words[i % len(words)]} {i}")
        i += 1
    return ", ".join(parts)


def encode(models, prompts, **kw):
    with torch.no_grad():
        return encode_prompts(
            prompts, models.tokenizer, models.tokenizer_2, models.text_encoder, models.text_encoder_2, **kw
        )


def test_one_window_equals_diffusers_encode_prompt_bit_for_bit(models, pipe) -> None:
    exactly_75 = long_prompt(models.tokenizer, 75)
    ids = models.tokenizer(exactly_75, add_special_tokens=False)["input_ids"][:75]
    exactly_75 = models.tokenizer.decode(ids)
    assert n_tokens(models.tokenizer, exactly_75) == 75
    prompts = SHORT + [exactly_75]
    with torch.no_grad():
        ref_hidden, _, ref_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    ours = encode(models, prompts, max_tokens=75, layout="kohya")
    assert ours.hidden.shape == ref_hidden.shape == (4, 77, 64)
    assert torch.equal(ours.hidden, ref_hidden)
    assert torch.equal(ours.pooled, ref_pooled)
    assert ours.truncated == [False] * 4
    # with room for 300 tokens, dynamic windows give the same single window for short prompts
    dyn = encode(models, prompts, max_tokens=300, layout="kohya", dynamic_windows=True)
    assert torch.equal(dyn.hidden, ref_hidden) and torch.equal(dyn.pooled, ref_pooled)
    # concat of one window is the same 77 states
    assert torch.equal(encode(models, prompts, max_tokens=75, layout="concat").hidden, ref_hidden)


def test_window_tokens_and_padding(models) -> None:
    text = long_prompt(models.tokenizer, 90)
    raw = models.tokenizer(text, add_special_tokens=False)["input_ids"]
    w1 = tokenize_windows([text], models.tokenizer, 300).ids[0]
    w2 = tokenize_windows([text], models.tokenizer_2, 300).ids[0]
    assert w1.shape == w2.shape == (4, 77)
    bos, eos = 49406, 49407
    k = len(raw) - 75
    for w, pad in ((w1, eos), (w2, 0)):
        assert w[0].tolist() == [bos] + raw[:75] + [eos]
        assert w[1].tolist() == [bos] + raw[75:] + [eos] + [pad] * (75 - k)
        for empty in (w[2], w[3]):
            assert empty.tolist() == [bos, eos] + [pad] * 75
    # window 0 of a long prompt is what the tokenizer gives with plain truncation at 77
    std = models.tokenizer_2(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert w2[0].tolist() == std


def test_300_tokens_layouts_and_windows_equal_encoding_alone(models) -> None:
    text = long_prompt(models.tokenizer, 310)
    prompts = [text, SHORT[0]]
    kohya = encode(models, prompts, max_tokens=300, layout="kohya")
    concat = encode(models, prompts, max_tokens=300, layout="concat")
    assert kohya.hidden.shape == (2, 302, 64) and sequence_length(4, "kohya") == 302
    assert concat.hidden.shape == (2, 308, 64) and sequence_length(4, "concat") == 308
    assert kohya.truncated == [True, False] and kohya.n_tokens[0] > 300
    ids1 = tokenize_windows(prompts, models.tokenizer, 300).ids
    ids2 = tokenize_windows(prompts, models.tokenizer_2, 300).ids
    with torch.no_grad():
        for b in range(2):
            for i in range(4):
                h1 = models.text_encoder(ids1[b, i : i + 1], output_hidden_states=True).hidden_states[-2]
                o2 = models.text_encoder_2(ids2[b, i : i + 1], output_hidden_states=True)
                alone = torch.cat([h1, o2.hidden_states[-2]], dim=-1)[0]  # (77, 64)
                assert torch.equal(concat.hidden[b, 77 * i : 77 * (i + 1)], alone)
                assert torch.equal(kohya.hidden[b, 1 + 75 * i : 1 + 75 * (i + 1)], alone[1:76])
                if i == 0:
                    assert torch.equal(kohya.hidden[b, 0], alone[0])
                    # the projection of one row vs a batch of rows may take another GEMM path: last-ulp tolerance
                    torch.testing.assert_close(kohya.pooled[b], o2[0][0], rtol=1e-6, atol=1e-6)
                    assert torch.equal(concat.pooled[b], kohya.pooled[b])
                if i == 3:
                    assert torch.equal(kohya.hidden[b, -1], alone[76])
    # windows differ: the assembly really takes each window's own states
    assert not torch.equal(kohya.hidden[0, 1:76], kohya.hidden[0, 76:151])


def test_truncation_counted_in_summary(models, caplog) -> None:
    enc = PromptEncoder(
        models.tokenizer, models.tokenizer_2, models.text_encoder, models.text_encoder_2, max_tokens=150
    )
    with torch.no_grad():
        enc([long_prompt(models.tokenizer, 160), SHORT[0]])
        enc([long_prompt(models.tokenizer, 200)])
        out = enc(SHORT)
    assert out.hidden.shape == (3, 152, 64)
    assert (enc.prompts, enc.truncated) == (6, 2) and enc.longest >= 200
    assert "truncated to 150 tokens: 2" in enc.summary()
    warned = [m for m in caplog.messages if "max_tokens=150" in m]
    assert len(warned) == 1 and "1 of 2 prompts" in warned[0] and "raise data.max_tokens" in warned[0]  # once, counted always


def test_gradients_reach_trained_text_encoders(models) -> None:
    import copy

    te1 = copy.deepcopy(models.text_encoder)
    out = encode_prompts([SHORT[0]], models.tokenizer, models.tokenizer_2, te1, models.text_encoder_2, 150)
    out.hidden.sum().backward()
    grads = [p.grad for p in te1.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("kw", [dict(max_tokens=100), dict(max_tokens=0), dict(layout="a1111")])
def test_bad_settings(models, kw) -> None:
    with pytest.raises(ConfigError):
        encode(models, ["x"], **{"max_tokens": 75, "layout": "kohya", **kw})


def test_time_ids_order() -> None:
    t = make_time_ids([(1200, 800)], [(16, 0)], [(1216, 832)])
    assert t.shape == (1, 6) and t.dtype == torch.float32
    assert t.tolist() == [[1200, 800, 16, 0, 1216, 832]]
    plan = plan_crop(800, 1200, Bucket(832, 1216))
    assert tuple(int(x) for x in t[0]) == plan.time_ids()
    with pytest.raises(ValueError):
        make_time_ids([(1, 1)], [], [(1, 1)])


def test_exclamation_marks_keep_their_ids_for_te2(models) -> None:
    """'!' is TE2's pad token in diffusers; inside a prompt it must stay a normal token.

    OpenCLIP, kohya (Kohaku XL's trainer), ComfyUI and A1111 tokenize "!" as 256;
    diffusers' tokenizer_2 would turn it into the pad id 0.
    """
    text = "1girl, surprised !, wow !?, !!"
    with torch.no_grad():
        emb = encode(models, [text], max_tokens=75, layout="kohya")
    raw = models.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 748 in raw  # "!!</w>", as OpenCLIP's own tokenizer gives it
    raw_2 = models.tokenizer_2(text, add_special_tokens=False)["input_ids"]
    assert raw_2 != raw and 748 not in raw_2  # diffusers' tokenizer_2 collapses it to the pad id
    ids2 = [49406] + raw + [49407] + [0] * (75 - len(raw))
    with torch.no_grad():
        h2 = models.text_encoder_2(torch.tensor([ids2]), output_hidden_states=True).hidden_states[-2][0]
    assert torch.equal(emb.hidden[0, :, 32:], h2)

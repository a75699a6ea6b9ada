"""Offline SDXL CLIP tokenizers: vocabulary, reference ids, parity with transformers, save/load.

Reference ids are real CLIP's, as published independently of this project:
- "a photo of a cat" / "a photo of a dog": elixir-nx/bumblebee's CLIP tokenizer test
  (openai/clip-vit-base-patch32); also zer0int/CLIP-tokenizer's README.
- "a painting of a cat", "bozuman": ``clip.tokenize`` outputs in nishio's CLIP notes.
- "The quick brown fox ...": a transformers ``CLIPTokenizer`` walk-through (clip-vit-base-patch32).
- "Hello, world!", "don't stop 42 times": CLIP tokenizer tests of two BPE ports.
- "! !! !!!": huggingface/diffusers issue #4153 (open_clip vs the SDXL ``tokenizer_2`` folder).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import pytest

from lokr_trainer.errors import MissingComponentError
from lokr_trainer.sdxl import tokenizers as tk

LOGGER = "lokr_trainer.sdxl.tokenizers"
BOS, EOS = 49406, 49407

# text -> ids of real CLIP (both encoders agree on these: no "!" in them)
REFERENCE_IDS = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "a photo of a dog": [BOS, 320, 1125, 539, 320, 1929, EOS],
    "a painting of a cat": [BOS, 320, 3086, 539, 320, 2368, EOS],
    "bozuman": [BOS, 647, 4091, 786, EOS],
    "The quick brown fox jumps over the lazy dog.": [BOS, 518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929, 269, EOS],
    "don't stop 42 times": [BOS, 847, 713, 1691, 275, 273, 1661, EOS],
    "": [BOS, EOS],
}

LONG_PROMPT = ", ".join(
    [
        "masterpiece, best quality, newest, safe, 1girl, solo, hatsune_miku, vocaloid",
        *[f"detailed background {i}, looking at viewer, smile, aqua_hair, twintails" for i in range(30)],
    ]
)

PROMPTS = [
    "a photo of a cat",
    "",
    "A PHOTO of  a Cat",
    "1girl, hatsune_miku, vocaloid, aqua_hair, :3, ^_^, >_<, :d, ;), o_o, x_x",
    "(masterpiece:1.2), [bad], ((best quality)), {detailed}, (blue eyes:0.8), \\(artist\\), <lora:x:0.7>",
    "emoji 🐱🔥 ❤️ 👩‍👩‍👧 🇯🇵 done",
    "unicode café naïve Ωmega straße 日本語のテキスト 東方Project Ænima",
    "decomposed xa\u0303y and composed x\xe3y",
    "tabs\tand\nnew lines   and  spaces ",
    "numbers 1234 3.14 20% it's we're you'll",
    "hi!! wow!!! !? ?! :!",
    "literal <|startoftext|> a <|endoftext|> b",
    LONG_PROMPT,
]

PAD = {"te1": EOS, "te2": 0}
PADDED = {"padding": "max_length", "max_length": 77, "truncation": True}


# ----------------------------------------------------------------------------- helpers


def _derive_vocab_files(out: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt from the bundled OpenAI file, written independently of the module."""
    text = gzip.decompress(tk.BPE_VOCAB_PATH.read_bytes()).decode("utf-8")
    merge_lines = text.split("\n")[1 : 1 + 48894]
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_char = {b: chr(b) for b in kept}
    for b in range(256):
        if b not in byte_char:
            byte_char[b] = chr(256 + len(byte_char) - len(kept))
    alphabet = list(byte_char.values())  # printable bytes first, then the shifted ones
    words = alphabet + [c + "</w>" for c in alphabet] + [line.replace(" ", "") for line in merge_lines]
    words += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps({w: i for i, w in enumerate(words)}), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def _reference_classes() -> list[type]:
    """transformers' CLIPTokenizer, plus CLIPTokenizerFast where it is a different class (transformers 4)."""
    import transformers

    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)
    return classes


REFERENCE_CLASSES = _reference_classes()


def _ids(tokenizer, text: str, **kw) -> list[int]:
    return list(tokenizer(text, **kw).input_ids)


def _folder_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def built():
    te1, te2 = tk.build_tokenizers()
    return {"te1": te1, "te2": te2}


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    return _derive_vocab_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "pipe"
    tk.save_tokenizers(built["te1"], built["te2"], root)
    return root


# ----------------------------------------------------------------------------- vocabulary


def test_bundled_vocabulary_file_and_licence():
    assert hashlib.sha256(tk.BPE_VOCAB_PATH.read_bytes()).hexdigest() == tk.BPE_VOCAB_SHA256
    licence = (tk.BPE_VOCAB_PATH.parent / "LICENSE-CLIP-vocab.txt").read_text(encoding="utf-8")
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence
    assert "bpe_simple_vocab_16e6.txt.gz" in licence


@pytest.mark.parametrize("name", ["te1", "te2"])
def test_vocabulary_special_ids_and_padding(built, name):
    tok = built[name]
    assert tok.is_fast  # tokenizers-backed under transformers 4 and 5: same ids, no ftfy
    assert tok.vocab_size == 49408 and len(tok) == 49408
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", BOS)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", EOS)
    assert tok.pad_token_id == PAD[name]
    assert tok.pad_token == {"te1": "<|endoftext|>", "te2": "!"}[name]
    assert tok.model_max_length == 77
    # byte alphabet first, then the same with </w>, then merges, then the specials
    assert tok.convert_ids_to_tokens([0, 187, 188, 255, 256, 320, 511, 512]) == [
        "!", "ÿ", "Ā", "Ń", "!</w>", "a</w>", "Ń</w>", "in",
    ]


def test_builtin_vocabulary_equals_independent_derivation(built, vocab_files):
    vocab_path, merges_path = vocab_files
    expected_vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    expected_merges = merges_path.read_text(encoding="utf-8").split("\n")[1:-1]
    for tok in built.values():
        assert tok.get_vocab() == expected_vocab
        model = json.loads(tok.backend_tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        assert merges == expected_merges
        assert len(merges) == 48894


@pytest.mark.parametrize("name", ["te1", "te2"])
@pytest.mark.parametrize("text", list(REFERENCE_IDS))
def test_reference_ids_of_real_clip(built, name, text):
    assert _ids(built[name], text) == REFERENCE_IDS[text]


def test_exclamation_mark_differs_between_encoders_like_diffusers(built):
    # TE1 (and open_clip) tokenize "!" by BPE; TE2's pad token "!" is a special token in
    # transformers, so each "!" becomes id 0, exactly as diffusers' SDXL tokenizer_2 does.
    assert _ids(built["te1"], "Hello, world!") == [BOS, 3306, 267, 1002, 256, EOS]
    assert _ids(built["te1"], "! !! !!!") == [BOS, 256, 748, 995, EOS]
    assert _ids(built["te2"], "! !! !!!", **PADDED) == [BOS, 0, 0, 0, 0, 0, 0, EOS] + [0] * 69


def test_fresh_objects_each_call(built):
    te1, te2 = tk.build_tokenizers()
    assert te1 is not built["te1"] and te2 is not built["te2"]
    te1.add_tokens(["<my-new-token>"])
    assert len(te1) == 49409 and len(built["te1"]) == 49408 and len(tk.build_tokenizers()[0]) == 49408


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("ref_cls", REFERENCE_CLASSES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("name", ["te1", "te2"])
def test_ids_equal_transformers_own_constructor(built, vocab_files, name, ref_cls):
    ref = ref_cls(str(vocab_files[0]), str(vocab_files[1]), pad_token=built[name].pad_token)
    if not ref.is_fast:
        pytest.importorskip("ftfy", reason="transformers 4's slow CLIPTokenizer only matches CLIP with ftfy")
    ours = built[name]
    for text in PROMPTS:
        assert _ids(ours, text) == _ids(ref, text), text
        padded = _ids(ours, text, **PADDED)
        assert padded == _ids(ref, text, **PADDED), text
        assert len(padded) == 77 and padded[0] == BOS
    batch = ours(PROMPTS, **PADDED).input_ids
    assert [list(row) for row in batch] == [list(row) for row in ref(PROMPTS, **PADDED).input_ids]


@pytest.mark.parametrize("name", ["te1", "te2"])
def test_padding_and_truncation_per_encoder(built, name):
    tok = built[name]
    short = _ids(tok, "a photo of a cat", **PADDED)
    assert short[:7] == REFERENCE_IDS["a photo of a cat"]
    assert short[7:] == [PAD[name]] * 70
    full = _ids(tok, LONG_PROMPT)
    assert len(full) > 300 and full[0] == BOS and full[-1] == EOS
    cut = _ids(tok, LONG_PROMPT, **PADDED)
    assert cut == full[:76] + [EOS]


# ----------------------------------------------------------------------------- save / load


def test_save_writes_loadable_deterministic_folders(built, saved, tmp_path):
    for sub in ("tokenizer", "tokenizer_2"):
        names = {p.name for p in (saved / sub).iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    te1, te2 = tk.load_tokenizers(saved)
    for name, tok in (("te1", te1), ("te2", te2)):
        assert tok.pad_token_id == PAD[name] and tok.model_max_length == 77
        for text in PROMPTS:
            assert _ids(tok, text) == _ids(built[name], text), text
            assert _ids(tok, text, **PADDED) == _ids(built[name], text, **PADDED), text
    # save again what was loaded, after calls that leave padding/truncation state behind
    te2(PROMPTS, padding="max_length", max_length=77, truncation=True)
    tk.save_tokenizers(te1, te2, tmp_path / "again")
    assert _folder_digests(tmp_path / "again") == _folder_digests(saved)
    # and a fresh build saves the same bytes
    tk.save_tokenizers(*tk.build_tokenizers(), tmp_path / "fresh")
    assert _folder_digests(tmp_path / "fresh") == _folder_digests(saved)


def test_save_replaces_stale_files(built, tmp_path):
    stale = tmp_path / "pipe" / "tokenizer"
    stale.mkdir(parents=True)
    (stale / "added_tokens.json").write_text('{"<old>": 49408}')
    (stale / "README.txt").write_text("kept")
    tk.save_tokenizers(built["te1"], built["te2"], tmp_path / "pipe")
    assert not (stale / "added_tokens.json").exists()
    assert (stale / "README.txt").read_text() == "kept"
    assert not [p for p in (tmp_path / "pipe").iterdir() if p.name.startswith(".")]  # no scratch left


@pytest.mark.parametrize("ref_cls", REFERENCE_CLASSES, ids=lambda cls: cls.__name__)
def test_saved_folders_load_with_transformers_directly(built, saved, ref_cls):
    for name, sub in (("te1", "tokenizer"), ("te2", "tokenizer_2")):
        tok = ref_cls.from_pretrained(saved / sub, local_files_only=True)
        if not tok.is_fast:
            pytest.importorskip("ftfy", reason="transformers 4's slow CLIPTokenizer only matches CLIP with ftfy")
        assert tok.pad_token_id == PAD[name] and tok.model_max_length == 77
        for text in PROMPTS:
            assert _ids(tok, text, **PADDED) == _ids(built[name], text, **PADDED), text


def _write_hub_style_folder(folder: Path, vocab_files: tuple[Path, Path], pad: str) -> None:
    """A tokenizer folder shaped like the official SDXL ones: classic files, no tokenizer.json."""
    folder.mkdir(parents=True)
    for src in vocab_files:
        (folder / src.name).write_bytes(src.read_bytes())
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "do_lower_case": True, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_load_hub_style_folders(built, vocab_files, tmp_path, caplog):
    _write_hub_style_folder(tmp_path / "tokenizer", vocab_files, "<|endoftext|>")
    _write_hub_style_folder(tmp_path / "tokenizer_2", vocab_files, "!")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        te1, te2 = tk.load_tokenizers(tmp_path)
    assert "loaded" in caplog.text and "tokenizer_2" in caplog.text and "built-in" not in caplog.text
    for name, tok in (("te1", te1), ("te2", te2)):
        assert tok.pad_token_id == PAD[name]
        for text in PROMPTS:
            assert _ids(tok, text, **PADDED) == _ids(built[name], text, **PADDED), text


@pytest.mark.parametrize("where", ["none", "missing_dir", "file", "dir_without_tokenizers"])
def test_builtin_when_no_tokenizer_folder(built, tmp_path, caplog, where):
    arg = {
        "none": None,
        "missing_dir": tmp_path / "nope",
        "file": tmp_path / "model.safetensors",
        "dir_without_tokenizers": tmp_path,
    }[where]
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        te1, te2 = tk.load_tokenizers(arg)
    assert "built-in" in caplog.text
    assert (te1.pad_token_id, te2.pad_token_id) == (EOS, 0)
    assert _ids(te2, LONG_PROMPT, **PADDED) == _ids(built["te2"], LONG_PROMPT, **PADDED)


def test_one_folder_missing_uses_builtin_for_it(built, saved, tmp_path, caplog):
    (tmp_path / "tokenizer_2").mkdir()
    for p in (saved / "tokenizer_2").iterdir():
        (tmp_path / "tokenizer_2" / p.name).write_bytes(p.read_bytes())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        te1, te2 = tk.load_tokenizers(tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tokenizer is missing" in warnings[0].getMessage()
    assert (te1.pad_token_id, te2.pad_token_id) == (EOS, 0)
    assert _ids(te1, "hi!! ^_^") == _ids(built["te1"], "hi!! ^_^")


def _break(folder: Path, how: str) -> None:
    if how == "file_not_folder":
        folder.write_text("not a folder")
        return
    folder.mkdir()
    if how == "garbage_json":
        (folder / "tokenizer.json").write_text("{ this is not json")
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "CLIPTokenizer"}')
    elif how == "wrong_vocabulary":
        (folder / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "CLIPTokenizer"}')


@pytest.mark.parametrize("how", ["empty", "file_not_folder", "garbage_json", "wrong_vocabulary"])
@pytest.mark.parametrize("sub", ["tokenizer", "tokenizer_2"])
def test_broken_folder_raises_naming_it(saved, tmp_path, sub, how):
    other = "tokenizer_2" if sub == "tokenizer" else "tokenizer"
    (tmp_path / other).mkdir()
    for p in (saved / other).iterdir():
        (tmp_path / other / p.name).write_bytes(p.read_bytes())
    _break(tmp_path / sub, how)
    with pytest.raises(MissingComponentError) as info:
        tk.load_tokenizers(tmp_path)
    assert info.value.path == tmp_path / sub
    assert str(tmp_path / sub) in str(info.value)


def test_loaded_folder_without_max_length_gets_77(vocab_files, tmp_path, caplog):
    _write_hub_style_folder(tmp_path / "tokenizer", vocab_files, "<|endoftext|>")
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        te1, _ = tk.load_tokenizers(tmp_path)
    assert te1.model_max_length == 77
    assert "model_max_length" in caplog.text

"""Both SDXL CLIP tokenizers, built offline from a vocabulary we ship.

SDXL's two text encoders (TE1 = CLIP ViT-L/14, TE2 = OpenCLIP ViT-bigG/14, which
diffusers calls ``tokenizer_2``) share OpenAI's CLIP byte-level BPE vocabulary:
49408 tokens, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, 77
positions.  They differ only in padding: TE1 pads with ``<|endoftext|>``, TE2
with ``!`` (id 0), as in the official diffusers SDXL folders.

No installed package ships that vocabulary, and we never download from a model
hub, so ``data/bpe_simple_vocab_16e6.txt.gz`` (OpenAI's file, MIT, see
``data/LICENSE-CLIP-vocab.txt``) is bundled and turned into vocab + merges here.

Which tokenizer class: transformers 5's ``CLIPTokenizer`` is backed by the
``tokenizers`` library (``CLIPTokenizerFast`` is the same class there); under
transformers 4 we use ``CLIPTokenizerFast``, because the 4.x slow
``CLIPTokenizer`` tokenizes differently unless ``ftfy`` is installed (it falls
back to BERT's basic tokenizer: no NFC, CJK split apart).  So the ids are the
same under both majors and ``ftfy`` is never needed.

Known quirk, kept on purpose for parity with diffusers: ``!`` is TE2's pad
*token*, so transformers treats it as a special token and a ``!`` inside a
prompt becomes its own id 0 for TE2 (``"hi!!"`` -> ``1883, 0, 0``), while TE1 and
OpenCLIP's own tokenizer give the BPE ids (``1883, 748``).  The official
``stabilityai`` ``tokenizer_2`` folder behaves the same way (diffusers issue
#4153).

``save_tokenizers`` writes both the ``tokenizers`` file (``tokenizer.json``) and
the classic ``vocab.json`` + ``merges.txt``, so transformers 4 and 5 (slow or
fast) and tools that read the classic files all load the folders offline.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lokr_trainer.errors import CorruptFileError, MissingComponentError

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import CLIPTokenizerFast

logger = logging.getLogger(__name__)

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "BPE_VOCAB_PATH",
    "EOS_ID",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "TE1_PAD_TOKEN",
    "TE2_PAD_TOKEN",
    "VOCAB_SIZE",
    "build_tokenizers",
    "load_tokenizers",
    "save_tokenizers",
]

#: Size of the CLIP vocabulary (256 bytes, 256 bytes + ``</w>``, 48894 merges, 2 specials).
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
#: Both text encoders have 77 positions (BOS + 75 tokens + EOS).
MODEL_MAX_LENGTH = 77
#: TE1 (CLIP-L) pads with EOS; TE2 (bigG, diffusers ``tokenizer_2``) pads with ``!`` = id 0.
TE1_PAD_TOKEN = EOS_TOKEN
TE2_PAD_TOKEN = "!"

#: The bundled OpenAI BPE file and its SHA-256 (the widely published hash of
#: ``openai/CLIP``'s ``clip/bpe_simple_vocab_16e6.txt.gz``).
BPE_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
BPE_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

#: CLIP uses the first 49152 - 256 - 2 merges of the file (the rest were never trained).
_NUM_MERGES = 49152 - 256 - 2
_END_OF_WORD = "</w>"
_MERGES_HEADER = "#version: 0.2"

#: Real CLIP's ids for one sentence; a loaded tokenizer must reproduce them exactly.
_PROBE_TEXT = "a photo of a cat"
_PROBE_IDS = [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]

#: Files a tokenizer folder may hold; stale ones are removed when saving so that a
#: folder never mixes two tokenizers.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
#: Keys of tokenizer_config.json that record where and how a tokenizer was loaded, not
#: what it is (transformers 5 keeps ``from_pretrained`` arguments such as ``is_local``).
_VOLATILE_CONFIG_KEYS = (
    "name_or_path",
    "special_tokens_map_file",
    "tokenizer_file",
    "vocab_file",
    "merges_file",
    "is_local",
    "local_files_only",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "revision",
    "subfolder",
    "trust_remote_code",
    "_commit_hash",
)


# ----------------------------------------------------------------------------- vocabulary


def _byte_symbols() -> list[str]:
    """The 256 one-character symbols that stand for the 256 byte values, in id order.

    Byte-level BPE needs a printable character for every byte.  Bytes that are
    printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves and come first; the other 68 bytes (controls, space, soft hyphen)
    are given the code points 256, 257, ... in byte order and come after them.
    """
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    n_shifted = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(n_shifted)]


@functools.cache
def _clip_vocabulary() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Tokens in id order and the ranked merges, derived from the bundled BPE file.

    Cached for the process: reading and checking the 1.3 MB file is the slow part
    of building a tokenizer, and the result never changes.
    """
    path = BPE_VOCAB_PATH
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise MissingComponentError(
            path, f"the bundled CLIP vocabulary cannot be read ({err})", "reinstall lokr-trainer"
        ) from err
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BPE_VOCAB_SHA256:
        raise CorruptFileError(
            path, f"the bundled CLIP vocabulary has SHA-256 {digest}, expected {BPE_VOCAB_SHA256}", "reinstall lokr-trainer"
        )
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is the header ('"bpe_simple_vocab_16e6.txt#version: 0.2'), then one merge per line.
    merges = tuple(tuple(line.split(" ")) for line in lines[1 : 1 + _NUM_MERGES])
    if len(merges) != _NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise CorruptFileError(path, "the bundled CLIP vocabulary does not hold 48894 merges of two symbols each")
    symbols = _byte_symbols()
    tokens = (
        *symbols,
        *(symbol + _END_OF_WORD for symbol in symbols),
        *(first + second for first, second in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    )
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise CorruptFileError(path, f"the derived CLIP vocabulary has {len(set(tokens))} distinct tokens, not {VOCAB_SIZE}")
    return tokens, merges  # type: ignore[return-value]


def _write_vocab_json(path: Path, vocab: dict[str, int]) -> None:
    """``vocab.json`` as transformers' classic loaders read it, ordered by id (deterministic)."""
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    path.write_text(json.dumps(ordered, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_merges_txt(path: Path, merges: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> None:
    """``merges.txt``: the GPT-2 style header line, then one ``first second`` pair per line."""
    body = "\n".join(f"{first} {second}" for first, second in merges)
    path.write_text(f"{_MERGES_HEADER}\n{body}\n", encoding="utf-8")


# ----------------------------------------------------------------------------- building


def _tokenizer_class() -> type[CLIPTokenizerFast]:
    """The ``tokenizers``-backed CLIP class: ``CLIPTokenizer`` in transformers 5, ``CLIPTokenizerFast`` in 4."""
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast


def _build_one(pad_token: str) -> CLIPTokenizerFast:
    """One CLIP tokenizer from the bundled vocabulary, through transformers' own constructor."""
    tokens, merges = _clip_vocabulary()
    cls = _tokenizer_class()
    common: dict[str, Any] = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    if "vocab" in inspect.signature(cls.__init__).parameters:
        # transformers 5: the constructor takes the vocabulary and merges as objects.
        return cls(vocab={token: i for i, token in enumerate(tokens)}, merges=list(merges), **common)
    # transformers 4: the constructor wants the classic files (it converts through the slow class).
    with tempfile.TemporaryDirectory(prefix="lokr_clip_vocab_") as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        _write_vocab_json(vocab_file, {token: i for i, token in enumerate(tokens)})
        _write_merges_txt(merges_file, merges)
        return cls(vocab_file=str(vocab_file), merges_file=str(merges_file), **common)


def build_tokenizers() -> tuple[CLIPTokenizerFast, CLIPTokenizerFast]:
    """SDXL's two tokenizers from the bundled CLIP vocabulary, without any download.

    Returns new objects on every call (callers may add tokens or change
    settings), while the vocabulary itself is derived once per process.
    TE1 pads with ``<|endoftext|>``, TE2 with ``!`` (id 0).
    """
    return _build_one(TE1_PAD_TOKEN), _build_one(TE2_PAD_TOKEN)


# ----------------------------------------------------------------------------- loading


def _clip_problems(tokenizer: Any) -> list[str]:
    """Why ``tokenizer`` cannot drive an SDXL text encoder (empty list: it can)."""
    problems = []
    if tokenizer.vocab_size != VOCAB_SIZE:
        problems.append(f"vocabulary has {tokenizer.vocab_size} tokens, not {VOCAB_SIZE}")
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID:
        problems.append(
            f"BOS/EOS ids are {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, not {BOS_ID}/{EOS_ID}"
        )
    if not problems:
        ids = list(tokenizer(_PROBE_TEXT).input_ids)
        if ids != _PROBE_IDS:
            problems.append(f"{_PROBE_TEXT!r} encodes as {ids}, not CLIP's {_PROBE_IDS}")
    return problems


def _load_one(folder: Path, default_pad: str) -> CLIPTokenizerFast:
    """Load one tokenizer folder from disk only and check it is CLIP's."""
    hint = "repair or delete that folder (the built-in CLIP tokenizer is used when it is absent)"
    if not folder.is_dir():
        raise MissingComponentError(folder, "is not a folder", hint)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        # transformers 5 would quietly build a 3-token tokenizer from an empty folder
        raise MissingComponentError(folder, "holds neither tokenizer.json nor vocab.json + merges.txt", hint)
    try:
        tokenizer = _tokenizer_class().from_pretrained(str(folder), local_files_only=True)
        problems = _clip_problems(tokenizer)
    except Exception as err:  # noqa: BLE001 - transformers/tokenizers raise many types
        raise MissingComponentError(folder, f"tokenizer cannot be loaded ({type(err).__name__}: {err})", hint) from err
    if problems:
        raise MissingComponentError(folder, "is not an SDXL CLIP tokenizer: " + "; ".join(problems), hint)
    if tokenizer.pad_token is None:
        logger.warning("%s: tokenizer has no pad token; using %r", folder, default_pad)
        tokenizer.pad_token = default_pad
    elif tokenizer.pad_token != default_pad:
        # The folder is what this model was published with; keep it, but say so.
        logger.warning(
            "%s: tokenizer pads with %r (id %s), SDXL's usual pad here is %r; keeping the folder's choice",
            folder,
            tokenizer.pad_token,
            tokenizer.pad_token_id,
            default_pad,
        )
    if tokenizer.model_max_length != MODEL_MAX_LENGTH:
        logger.warning(
            "%s: model_max_length is %s; SDXL's text encoders have %d positions, using %d",
            folder,
            tokenizer.model_max_length,
            MODEL_MAX_LENGTH,
            MODEL_MAX_LENGTH,
        )
        tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer


def load_tokenizers(diffusers_dir: str | Path | None) -> tuple[CLIPTokenizerFast, CLIPTokenizerFast]:
    """SDXL's tokenizers from ``diffusers_dir/tokenizer{,_2}`` if present, else the built-in ones.

    A model's own folder wins because it may carry added tokens or a different
    pad token; a single-file checkpoint (``diffusers_dir`` None or a file) has no
    tokenizer, and the built-in CLIP vocabulary is what every SDXL uses.  Never
    contacts a hub.  One folder present and the other missing: the missing one is
    built in, with a warning.  A folder that is present but unusable raises
    :class:`~lokr_trainer.errors.MissingComponentError` naming it.
    """
    if diffusers_dir is None:
        logger.info("tokenizers: built-in CLIP vocabulary (no diffusers folder given)")
        return build_tokenizers()
    root = Path(diffusers_dir)
    if not root.is_dir():
        if root.exists():
            logger.info("tokenizers: built-in CLIP vocabulary (%s is a file, not a diffusers folder)", root)
        else:
            logger.warning("tokenizers: %s does not exist; using the built-in CLIP vocabulary", root)
        return build_tokenizers()
    folders = ((root / "tokenizer", TE1_PAD_TOKEN), (root / "tokenizer_2", TE2_PAD_TOKEN))
    if not any(folder.exists() for folder, _ in folders):
        logger.info("tokenizers: built-in CLIP vocabulary (%s has no tokenizer/ or tokenizer_2/)", root)
        return build_tokenizers()
    loaded = []
    for folder, pad in folders:
        if folder.exists():
            loaded.append(_load_one(folder, pad))
            logger.info("tokenizers: loaded %s", folder)
        else:
            logger.warning("tokenizers: %s is missing; using the built-in CLIP tokenizer for it", folder)
            loaded.append(_build_one(pad))
    return loaded[0], loaded[1]


# ----------------------------------------------------------------------------- saving


def _dump_json(path: Path, data: Any, *, sort_keys: bool) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _plain_special_tokens(data: dict[str, Any]) -> dict[str, Any]:
    """Special-token entries as plain strings.

    transformers 4 writes a special token either as a string or as an AddedToken
    dict depending on how it was set; the token's properties live in
    ``tokenizer.json`` and ``added_tokens_decoder`` anyway, so one spelling keeps
    the files byte-stable.
    """

    def plain(value: Any) -> Any:
        if isinstance(value, dict) and "content" in value:
            return value["content"]
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    return {key: plain(value) if key.endswith(("_token", "_tokens")) else value for key, value in data.items()}


def _write_tokenizer_folder(tokenizer: CLIPTokenizerFast, out: Path) -> None:
    """Write every file of one tokenizer folder into the empty folder ``out``, byte-deterministically."""
    tokenizer.save_pretrained(str(out))
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # transformers 5 leaves the padding/truncation of the last call in the backend;
    # saved, they would make the files depend on call history and be re-enabled on load.
    backend["padding"] = None
    backend["truncation"] = None
    _dump_json(out / "tokenizer.json", backend, sort_keys=False)
    model = backend["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    _write_vocab_json(out / "vocab.json", model["vocab"])
    _write_merges_txt(out / "merges.txt", merges)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        path = out / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if name == "tokenizer_config.json":
                for key in _VOLATILE_CONFIG_KEYS:
                    data.pop(key, None)
            if name != "added_tokens.json":
                data = _plain_special_tokens(data)
            _dump_json(path, data, sort_keys=True)


def _save_one(tokenizer: CLIPTokenizerFast, folder: Path) -> None:
    """Write into a scratch folder next to ``folder``, then move the files in, removing stale ones."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
        scratch = Path(tmp)
        _write_tokenizer_folder(tokenizer, scratch)
        folder.mkdir(exist_ok=True)
        for name in _TOKENIZER_FILES:
            if not (scratch / name).exists() and (folder / name).is_file():
                (folder / name).unlink()
        for path in sorted(scratch.iterdir()):
            os.replace(path, folder / path.name)


def save_tokenizers(
    tokenizer: CLIPTokenizerFast, tokenizer_2: CLIPTokenizerFast, diffusers_dir: str | Path
) -> None:
    """Write ``diffusers_dir/tokenizer/`` and ``diffusers_dir/tokenizer_2/``.

    The folders load offline with ``CLIPTokenizer.from_pretrained(folder)`` (slow
    or fast, transformers 4 or 5) and in diffusers' SDXL pipeline.  Output is
    byte-identical for equal tokenizers, whatever they were last called with or
    loaded from, so folders can be hashed and compared.
    """
    root = Path(diffusers_dir)
    root.mkdir(parents=True, exist_ok=True)
    _save_one(tokenizer, root / "tokenizer")
    _save_one(tokenizer_2, root / "tokenizer_2")

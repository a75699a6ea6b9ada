"""Restore the CLIP token/position embeddings of a checkpoint from a reference, from Python.

    python examples/restore_embeddings.py                      # the tiny fixture
    python examples/restore_embeddings.py --base my-finetune.safetensors \
        --reference sd_xl_base_1.0.safetensors --out my-finetune-restored.safetensors

Kohaku XL Delta's base did this to both of its parents before averaging them: a
finetune's trained embeddings (TE1 token + position, TE2 token + positional) are
replaced by SDXL 1.0's, bit for bit; every other tensor is the base's.  The merge
streams (one tensor at a time) and writes atomically.
"""

from __future__ import annotations

import argparse

from safetensors import safe_open

from lokr_trainer.merge import EMBEDDING_KEYS, restore_embeddings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="models/sdxl-other.safetensors", help="the checkpoint to fix")
    p.add_argument("--reference", default="models/sdxl-base.safetensors", help="where the embeddings come from")
    p.add_argument("--out", default="out/restored.safetensors", help="the new single-file checkpoint")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="output dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args()

    result = restore_embeddings(args.base, args.reference, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                progress=False)
    print(result.report)  # the plan: inputs, output, and per component how many keys were restored
    for w in result.warnings:
        print("warning:", w)

    # check it: the four embedding tensors are the reference's, bit for bit
    with safe_open(str(result.out), "pt") as out, safe_open(args.reference, "pt") as ref:
        restored = [k for k in EMBEDDING_KEYS if k in out.keys()]
        for k in restored:
            a, b = out.get_tensor(k), ref.get_tensor(k)
            assert a.float().equal(b.float()), k  # the same values (the dtype may differ only if lossless)
        print(f"{len(restored)} embedding tensors restored from {args.reference} into {result.out}")
    assert len(restored) == 4


if __name__ == "__main__":
    main()

"""``python -m lokr_trainer.merge``: the command line of :mod:`lokr_trainer.merge`.

Exit status: 0 done, 1 refused or failed (the message names the file and
key; nothing was written), 2 bad command line, 130 interrupted (nothing
written).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

EPILOG = """\
examples:
  # Kohaku XL Delta's base: restore the CLIP embeddings, average two models
  python -m lokr_trainer.merge --out base.safetensors --base gamma.safetensors --base beta.safetensors \\
      --weights 0.5 0.5 --restore-embeddings sd_xl_base_1.0.safetensors
  # bake a LoKr (multiplier 1.0) and a second one at 0.5
  python -m lokr_trainer.merge --out final.safetensors --base base.safetensors \\
      --lokr delta.safetensors --lokr style.safetensors:0.5
  # the same from a file; command-line options replace the file's values
  python -m lokr_trainer.merge --recipe recipe.toml --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lokr_trainer.merge",
        description="Streaming SDXL merges: weighted sum -> CLIP embedding restore -> LoKr bake, "
        "in fp32, written as one single-file checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", type=Path, help="TOML file with these options (see docs/merge.md)")
    p.add_argument("--out", type=Path, help="output .safetensors file")
    p.add_argument("--base", action="extend", nargs="+", type=Path, metavar="PATH",
                   help="base checkpoint: .safetensors file or diffusers folder (repeat for a weighted sum)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per --base (default: average)")
    p.add_argument("--restore-embeddings", type=Path, metavar="REF",
                   help="copy CLIP-L and bigG token/position embeddings from REF, bit-exact")
    p.add_argument("--lokr", action="extend", nargs="+", metavar="PATH[:MULT]",
                   help="LoKr file to bake, with multiplier (default 1.0); repeat for several")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="output float dtype (default fp16)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing OUT")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan and expected peak memory; write nothing")
    p.add_argument("--skip-unmatched", action="store_true", default=None,
                   help="skip LoKr modules the base lacks (with a warning) instead of stopping")
    p.add_argument("--hash", action="store_true", default=None, dest="hash_inputs",
                   help="record every input's sha256 in the output metadata (reads each input twice)")
    p.add_argument("--title", help="modelspec.title of the output (default: OUT's file name)")
    p.add_argument("--workers", type=int, help="worker threads for reads and arithmetic (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from lokr_trainer.errors import LokrTrainerError
    from lokr_trainer.merge import run_recipe
    from lokr_trainer.merge.report import fmt_bytes
    from lokr_trainer.merge.recipe import LoKrInput, Recipe
    from lokr_trainer.merge.stream import tune_malloc

    tune_malloc()  # reuse freed tensor memory instead of faulting in fresh pages per tensor

    try:
        values = {
            "out": args.out,
            "bases": args.base,
            "weights": args.weights,
            "restore_embeddings": args.restore_embeddings,
            "lokrs": None if args.lokr is None else [LoKrInput.parse(x) for x in args.lokr],
            "dtype": args.dtype,
            "overwrite": args.overwrite,
            "skip_unmatched": args.skip_unmatched,
            "hash_inputs": args.hash_inputs,
            "title": args.title,
            "workers": args.workers,
        }
        if args.recipe is not None:
            recipe = args.recipe
            overrides = {k: v for k, v in values.items() if v is not None}
        else:
            if args.out is None or not args.base:
                parser.error("--out and at least one --base are required (or --recipe)")
            recipe = Recipe(**{k: v for k, v in values.items() if v is not None})
            overrides = {}
        result = run_recipe(recipe, dry_run=args.dry_run, progress=not args.no_progress, log_warnings=False, **overrides)
    except LokrTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    try:
        print(result.report)
        if result.dry_run:
            print("dry run: nothing written")
        else:
            s = result.stats
            print(f"wrote {result.out} ({fmt_bytes(s.bytes_written)}, {s.tensors} tensors) in {s.seconds:.1f} s")
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the merge is done; the reader just stopped listening
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

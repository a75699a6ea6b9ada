"""``python -m lokr_trainer.config {from-kohya,reference} ...``: one entry, one job per subcommand."""

from __future__ import annotations

import sys
from typing import Sequence

USAGE = """usage: python -m lokr_trainer.config {from-kohya,reference} ...

  from-kohya ARGS.toml [--dataset-config DATASET.toml] [--lycoris-preset PRESET.toml]
             [--num-processes N] -o RUN.toml [--overwrite]
                converts a kohya sd-scripts SDXL training config to a lokr_trainer run config
                (N = the GPUs the kohya run used: train.global_batch = batch x accumulation x N)
  reference [-o FILE] [--check]
                writes (or checks) the configuration reference generated from the config schema
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "from-kohya":
        from lokr_trainer.config.kohya import main as run
    elif command == "reference":
        from lokr_trainer.config.reference import main as run
    else:
        print(f"error: unknown command {command!r}; expected from-kohya or reference", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m lokr_trainer.train --config run.toml [--set table.key=value ...] [--resume latest|DIR]``.

Also runs under ``accelerate launch -m lokr_trainer.train ...`` and
``torchrun -m lokr_trainer.train ...`` (one process per GPU; the global batch
stays what the config says).  Exit codes: 0 done (or stopped with a
resumable state), 2 bad config or input (one line, no traceback, before any
model loads), 1 a run that could not go on (e.g. non-finite losses), 130
interrupted before training began or by a second Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lokr_trainer.errors import CheckpointError, ConfigError, DataError, LokrTrainerError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lokr_trainer.train",
        description="Train LoKr adapters on SDXL from a TOML run config.",
        epilog="Examples: --config configs/demo.toml --set train.max_steps=50 --set optimizer.unet_lr=2e-4",
    )
    p.add_argument("--config", required=True, help="TOML run config (see configs/ and docs/config.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override one config value (repeatable), e.g. train.seed=3 or optimizer.betas=[0.9,0.95]")
    p.add_argument("--resume", metavar="latest|DIR", help="continue from the newest state in output_dir, or from a state folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # a Ctrl-C before training began (imports, loading, caching) or a second one during a step
        print("interrupted: this interrupt saved nothing; a run resumes from its last saved state (--resume latest)",
              file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from lokr_trainer.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.to_toml(), end="")
            return 0
        from lokr_trainer.train.loop import Trainer

        Trainer(cfg, resume=args.resume, progress=not args.no_progress).fit()
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LokrTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m lokr_trainer.data SOURCE...``: print dataset statistics before a run.

SOURCE is a folder of images with sidecars, a ``.jsonl`` manifest, or a tar
shard pattern (``shards/{000..099}.tar``, needs the webdataset extra).
Exit status: 0 on success, 2 on a usage or data error (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Iterable, Sequence

from lokr_trainer.data.buckets import BucketConfig, BucketSet
from lokr_trainer.data.dataset import index_records, probe_record_size
from lokr_trainer.data.images import SkipLog
from lokr_trainer.data.records import SampleRecord
from lokr_trainer.data.sources import WebDatasetSource, open_source
from lokr_trainer.data.stats import compute_stats, format_stats
from lokr_trainer.data.tags import CaptionConfig, Captioner
from lokr_trainer.errors import BadImageError, LokrTrainerError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lokr_trainer.data",
        description="Print dataset statistics (counts, skipped files, buckets, special tags, tokens) before a run.",
    )
    p.add_argument("sources", nargs="+", help="folder, .jsonl manifest or .tar shard pattern")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--step", type=int, default=64, help="bucket side step (default 64)")
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=None, help="warn about buckets smaller than a batch")
    p.add_argument("--keep-tokens", type=int, default=0, help="first N tags of .txt captions are fixed")
    p.add_argument("--short-tag-max-len", type=int, default=3, help="tags this short keep underscores")
    p.add_argument("--top", type=int, default=20, help="how many top tags per category")
    p.add_argument("--limit", type=int, default=None, help="read at most N records (quick look at huge sets)")
    p.add_argument("--verify", action="store_true", help="read every image header even when metadata has sizes")
    p.add_argument("--no-tokens", action="store_true", help="skip caption token counting")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _records(sources: Sequence[str], keep_tokens: int, limit: int | None, skip_log: SkipLog) -> list[SampleRecord]:
    out: list[SampleRecord] = []
    for spec in sources:
        src: Iterable[SampleRecord] = open_source(spec, keep_tokens=keep_tokens)
        streamed = isinstance(src, WebDatasetSource)
        for rec in src:
            if limit is not None and len(out) >= limit:
                break
            if streamed:  # size now, then drop the bytes: statistics must not hold a shard in RAM
                try:
                    rec.width, rec.height = probe_record_size(rec)
                except BadImageError as e:
                    skip_log.add_error(e)
                    continue
                finally:
                    rec.data = None
            out.append(rec)
        if streamed and src.bad_shards:  # type: ignore[union-attr]
            for url in src.bad_shards:  # type: ignore[union-attr]
                skip_log.add(url, "unreadable shard", "bad_shard")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        bs = BucketSet.from_config(BucketConfig(args.resolution, args.step, args.min_side, args.max_side))
        skip_log = SkipLog()
        recs = _records(args.sources, args.keep_tokens, args.limit, skip_log)
        index = index_records(recs, bs, skip_log=skip_log, verify=args.verify, threads=args.threads,
                              progress=sys.stderr.isatty())  # fmt: skip
        captioner = Captioner(index.records, CaptionConfig(short_tag_max_len=args.short_tag_max_len))
        tokenizer = None
        if not args.no_tokens:
            from lokr_trainer.sdxl.tokenizers import build_tokenizers

            tokenizer = build_tokenizers()[0]
        stats = compute_stats(index, captioner, skip_log, top=args.top, tokenizer=tokenizer)
    except LokrTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats.to_json(), indent=2))
    else:
        print(format_stats(stats, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dataset statistics to read before a multi-day run: counts, buckets, special-tag and tag distributions.

What a user checks here: how many images survive (and which were skipped),
whether the bucket histogram has buckets with fewer images than a batch
(short batches), whether quality/rating/date tags are spread as expected, how
many images are upscaled a lot, and how many captions exceed the token limit.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from lokr_trainer.data.buckets import cover_size
from lokr_trainer.data.dataset import IndexedRecords
from lokr_trainer.data.images import SkipLog
from lokr_trainer.data.tags import Captioner, date_tag, normalize_tag

TOKEN_LIMITS = (75, 150, 225, 300)


@dataclass
class DatasetStats:
    images: int
    skipped: dict[str, Any]
    buckets: dict[str, int]
    ratings: dict[str, int]
    quality: dict[str, int]
    dates: dict[str, int]
    top_tags: dict[str, list[tuple[str, int]]]
    captions: dict[str, Any]
    upscaled_2x: int
    mean_aspect_error: float
    quality_thresholds: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compute_stats(
    index: IndexedRecords,
    captioner: Captioner | None = None,
    skip_log: SkipLog | None = None,
    top: int = 20,
    tokenizer: Any = None,
) -> DatasetStats:
    """Statistics over indexed records; ``tokenizer`` (optional) adds caption token counts."""
    captioner = captioner or Captioner(index.records)
    buckets: Counter[str] = Counter()
    ratings: Counter[str] = Counter()
    quality: Counter[str] = Counter()
    dates: Counter[str] = Counter()
    tags: dict[str, Counter[str]] = {c: Counter() for c in ("character", "copyright", "artist", "general")}
    n_tags: list[int] = []
    with_nl = only_nl = upscaled = 0
    ar_err = 0.0
    captions: list[str] = []
    for i, rec in enumerate(index.records):
        b = index.bucket_of(i)
        buckets[str(b)] += 1
        ratings[rec.rating or "unrated"] += 1
        q = captioner.quality.label(rec.rating, rec.fav_count) if captioner.quality else None
        quality[q or "none"] += 1
        dates[date_tag(rec.year) or "none"] += 1
        parts = captioner.parts(rec)
        cfg = captioner.cfg
        for cat in ("character", "copyright", "artist"):
            tags[cat].update(
                normalize_tag(t, cfg.short_tag_max_len, cfg.keep_underscore) for t in rec.tags.get(cat, [])
            )
        tags["general"].update(parts.general)
        n_tags.append(len(parts.fixed) + len(parts.general))
        with_nl += parts.nl is not None
        only_nl += parts.nl is not None and not parts.general
        w, h = int(rec.width), int(rec.height)  # type: ignore[arg-type]
        rw, _ = cover_size(w, h, b)
        upscaled += rw / w > 2.0
        ar_err += abs(math.log((w / h) / b.aspect))
        if tokenizer is not None:
            captions.append(captioner.fixed(rec))
    tokens: dict[str, Any] = {}
    if tokenizer is not None and captions:
        lengths = [len(x) for x in tokenizer(captions, add_special_tokens=False, verbose=False)["input_ids"]]
        tokens = {
            "max": max(lengths),
            "mean": sum(lengths) / len(lengths),
            **{f"over_{k}": sum(n > k for n in lengths) for k in TOKEN_LIMITS},
        }
    n = len(index.records)
    return DatasetStats(
        images=n,
        skipped=(skip_log.as_dict() if skip_log else {"total": 0}),
        buckets=dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        ratings=dict(ratings.most_common()),
        quality=dict(quality.most_common()),
        dates=dict(dates.most_common()),
        top_tags={c: cnt.most_common(top) for c, cnt in tags.items()},
        captions={
            "min_tags": min(n_tags) if n_tags else 0,
            "mean_tags": (sum(n_tags) / n) if n else 0.0,
            "max_tags": max(n_tags) if n_tags else 0,
            "with_nl_caption": with_nl,
            "nl_caption_only": only_nl,
        },
        upscaled_2x=upscaled,
        mean_aspect_error=ar_err / n if n else 0.0,
        quality_thresholds=captioner.quality.to_json() if captioner.quality else {},
        tokens=tokens,
    )


def _table(title: str, counts: dict[str, int], total: int, limit: int | None = None) -> list[str]:
    lines = [title]
    items = list(counts.items())[:limit] if limit else list(counts.items())
    width = max((len(k) for k, _ in items), default=0)
    for k, v in items:
        pct = 100.0 * v / total if total else 0.0
        lines.append(f"  {k:<{width}}  {v:>9}  {pct:5.1f}%")
    return lines


def format_stats(s: DatasetStats, batch_size: int | None = None) -> str:
    """Human-readable report (what ``python -m lokr_trainer.data`` prints)."""
    out = [f"images: {s.images}   skipped: {s.skipped.get('total', 0)}"]
    for kind, n in sorted(s.skipped.get("by_kind", {}).items()):
        ex = s.skipped.get("examples", {}).get(kind, [])
        out.append(f"  {kind}: {n}" + (f"  (e.g. {ex[0]})" if ex else ""))
    out += _table(f"buckets ({len(s.buckets)} used):", s.buckets, s.images)
    if batch_size:
        small = [k for k, v in s.buckets.items() if v < batch_size]
        if small:
            out.append(f"  {len(small)} bucket(s) hold fewer than batch_size={batch_size} images: {', '.join(small)}")
    out.append(
        f"mean aspect error |log(ar/bucket ar)|: {s.mean_aspect_error:.4f}; upscaled more than 2x: {s.upscaled_2x}"
    )
    out += _table("ratings:", s.ratings, s.images)
    out += _table("quality tags:", s.quality, s.images)
    out += _table("date tags:", s.dates, s.images)
    c = s.captions
    out.append(
        f"caption tags: min {c['min_tags']}, mean {c['mean_tags']:.1f}, max {c['max_tags']}; "
        f"with NL caption: {c['with_nl_caption']} (NL only: {c['nl_caption_only']})"
    )
    if s.tokens:
        t = s.tokens
        over = ", ".join(f">{k}: {t[f'over_{k}']}" for k in TOKEN_LIMITS)
        out.append(f"caption tokens: mean {t['mean']:.1f}, max {t['max']}; captions over {over}")
    for cat, items in s.top_tags.items():
        if items:
            out.append(f"top {cat} tags: " + ", ".join(f"{k} ({v})" for k, v in items))
    return "\n".join(out)

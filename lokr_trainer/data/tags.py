"""Kohaku XL captions from danbooru metadata: special tags, group order, per-step randomness.

Caption layout (Kohaku XL Delta/Zeta model cards, DESIGN.md §7)::

    <head>, <people>, <character>, <series>, <artist>, <special>, <general tags>, <NL caption>

* ``head``: a fixed, pre-made part (a ``.txt`` sidecar's text before ``|||``).
* ``people``: count tags (``1girl``, ``2boys``, ``multiple others``, …) pulled out
  of the general tags, in their original order.
* ``special``: quality, then rating, then date tags.
    - quality: from ``fav_count`` compared with the 95/85/75/50/25/10th
      percentiles *of the same rating* over the whole dataset; ``fav > p95`` →
      masterpiece, ``p85 < fav ≤ p95`` → best quality, … , ``fav ≤ p10`` →
      worst quality (strict ``>`` like HakuBooru, so ties with a boundary go to
      the lower label).  Percentiles are numpy's default (linear interpolation).
    - rating: general → safe, sensitive → sensitive, questionable → nsfw,
      explicit → nsfw, explicit.
    - date (upload year): ≤2010 old, 2011–2014 early, 2015–2017 mid,
      2018–2020 recent, ≥2021 newest; no year → no date tag.
* ``general``: general tags plus meta tags that describe the image (meta tags
  about the post, e.g. ``commentary_request``, are dropped); shuffled every
  step and thinned by tag dropout.
* NL caption: natural-language text, kept whole.

Underscores become spaces except in tags of at most ``short_tag_max_len``
(default 3) characters, which are almost always emoticons (``^_^``, ``>_<``,
``o_o``), and in tags listed in ``keep_underscore``.

Per-step randomness, drawn in this fixed order from one generator seeded by
``(seed, epoch, index)``: whole-caption dropout, group dropout, shuffle, tag
dropout.  Group dropout applies only when a record has both general tags and
an NL caption: with probability ``p`` the tags are dropped, with probability
``p`` (exclusive) the NL caption is, so one of them always remains.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from lokr_trainer.data.records import RATINGS, SampleRecord
from lokr_trainer.errors import ConfigError

QUALITY_LABELS: tuple[str, ...] = (
    "masterpiece",
    "best quality",
    "great quality",
    "good quality",
    "normal quality",
    "low quality",
    "worst quality",
)
#: Percentiles separating the seven quality labels, high to low.
QUALITY_PERCENTILES: tuple[int, ...] = (95, 85, 75, 50, 25, 10)

RATING_TAGS: Mapping[str, tuple[str, ...]] = {
    "general": ("safe",),
    "sensitive": ("sensitive",),
    "questionable": ("nsfw",),
    "explicit": ("nsfw", "explicit"),
}

#: ``(last year, tag)``; the first row whose year ≥ the upload year wins.
DATE_TAGS: tuple[tuple[int, str], ...] = (
    (2010, "old"),
    (2014, "early"),
    (2017, "mid"),
    (2020, "recent"),
)
NEWEST_TAG = "newest"

#: Count tags that open a Kohaku caption (raw danbooru spelling).
PEOPLE_TAGS: frozenset[str] = frozenset(
    [f"{n}{kind}" for kind in ("girl", "boy", "other") for n in ("1",)]
    + [f"{n}{kind}s" for kind in ("girl", "boy", "other") for n in ("2", "3", "4", "5", "6+")]
    + [f"multiple_{kind}s" for kind in ("girl", "boy", "other")]
    + ["male_focus"]
)

#: Substrings marking meta tags about the post rather than the picture.
META_DROP_KEYWORDS: tuple[str, ...] = (
    "commentary",
    "translat",
    "request",
    "revision",
    "bad_id",
    "bad_link",
    "bad_source",
    "mismatch",
    "md5",
    "audio",
    "video",
    "(medium)",
)

# Salt that separates the caption stream from other per-sample streams.
CAPTION_STREAM = 0xCA9


def quality_label(fav_count: float, thresholds: Sequence[float]) -> str:
    """Label for ``fav_count`` given the 95/85/75/50/25/10th percentile values (high → low)."""
    for label, t in zip(QUALITY_LABELS, thresholds):
        if fav_count > t:
            return label
    return QUALITY_LABELS[-1]


def date_tag(year: int | None) -> str | None:
    """Kohaku date tag for an upload year (``None`` when the year is unknown)."""
    if year is None:
        return None
    for last, tag in DATE_TAGS:
        if year <= last:
            return tag
    return NEWEST_TAG


def rating_tags(rating: str | None) -> tuple[str, ...]:
    return RATING_TAGS.get(rating, ()) if rating is not None else ()


def _group(rating: str | None) -> str:
    return rating if rating in RATINGS else "unrated"


@dataclass(frozen=True)
class QualityThresholds:
    """Per-rating fav_count percentile values, computed once over the whole dataset.

    Records without a rating form their own ``unrated`` group; records without
    ``fav_count`` get no quality tag and do not count.
    """

    by_rating: Mapping[str, tuple[float, ...]]
    counts: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Iterable[SampleRecord]) -> "QualityThresholds":
        favs: dict[str, list[float]] = defaultdict(list)
        for r in records:
            if r.fav_count is not None:
                favs[_group(r.rating)].append(float(r.fav_count))
        return cls.from_values(favs)

    @classmethod
    def from_values(cls, favs: Mapping[str, Sequence[float]]) -> "QualityThresholds":
        by: dict[str, tuple[float, ...]] = {}
        for g, v in favs.items():
            if len(v):
                by[g] = tuple(float(x) for x in np.percentile(np.asarray(v, dtype=np.float64), QUALITY_PERCENTILES))
        return cls(by, {g: len(v) for g, v in favs.items()})

    def label(self, rating: str | None, fav_count: float | None) -> str | None:
        if fav_count is None:
            return None
        t = self.by_rating.get(_group(rating))
        return None if t is None else quality_label(fav_count, t)

    def to_json(self) -> dict[str, object]:
        return {"percentiles": list(QUALITY_PERCENTILES), "by_rating": {k: list(v) for k, v in self.by_rating.items()}}


def normalize_tag(tag: str, short_tag_max_len: int = 3, keep_underscore: frozenset[str] = frozenset()) -> str:
    """Danbooru spelling → prompt spelling (``long_hair`` → ``long hair``; ``^_^`` kept)."""
    tag = tag.strip()
    if len(tag) <= short_tag_max_len or tag in keep_underscore:
        return tag
    return tag.replace("_", " ")


def is_dropped_meta(tag: str, keywords: Sequence[str] = META_DROP_KEYWORDS) -> bool:
    t = tag.strip().lower().replace(" ", "_")
    return any(k in t for k in keywords)


@dataclass(frozen=True)
class CaptionConfig:
    """Caption rules.  Recipes: Delta ``tag_dropout=0.1``; Zeta ``tag_dropout=0.2, group_dropout=0.2``."""

    shuffle_general: bool = True
    tag_dropout: float = 0.0
    group_dropout: float = 0.0
    caption_dropout: float = 0.0
    quality_tags: bool = True
    rating_tags: bool = True
    date_tags: bool = True
    short_tag_max_len: int = 3
    keep_underscore: frozenset[str] = frozenset()
    people_tags: frozenset[str] = PEOPLE_TAGS
    meta_drop_keywords: tuple[str, ...] = META_DROP_KEYWORDS
    separator: str = ", "

    def validate(self) -> None:
        for name in ("tag_dropout", "caption_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.group_dropout <= 0.5:
            raise ConfigError(
                f"group_dropout must be in [0, 0.5] (tags and NL caption are dropped exclusively), "
                f"got {self.group_dropout}"
            )
        if self.short_tag_max_len < 0:
            raise ConfigError("short_tag_max_len must be >= 0")

    @property
    def is_fixed(self) -> bool:
        """True when a record always gets the same caption (required for a text-encoder cache)."""
        return (
            not self.shuffle_general and self.tag_dropout == 0 and self.group_dropout == 0 and self.caption_dropout == 0
        )


@dataclass(frozen=True)
class CaptionParts:
    """A record's caption, split into the groups that per-step randomness treats differently."""

    fixed: tuple[str, ...]
    general: tuple[str, ...]
    nl: str | None

    def join(self, general: Sequence[str], nl: str | None, sep: str) -> str:
        items = list(self.fixed) + list(general)
        if nl:
            items.append(nl)
        return sep.join(items)


def caption_parts(
    record: SampleRecord, cfg: CaptionConfig = CaptionConfig(), quality: QualityThresholds | None = None
) -> CaptionParts:
    """The deterministic part of captioning: grouping, ordering, special tags, spelling."""

    def norm(t: str) -> str:
        return normalize_tag(t, cfg.short_tag_max_len, cfg.keep_underscore)

    tags = record.tags
    general_raw = [t for t in tags.get("general", []) if t.strip()]
    people = [t for t in general_raw if t.strip().replace(" ", "_") in cfg.people_tags]
    people_set = set(people)
    general = [t for t in general_raw if t not in people_set]
    general += [t for t in tags.get("meta", []) if t.strip() and not is_dropped_meta(t, cfg.meta_drop_keywords)]

    special: list[str] = []
    if cfg.quality_tags and quality is not None:
        q = quality.label(record.rating, record.fav_count)
        if q:
            special.append(q)
    if cfg.rating_tags:
        special.extend(rating_tags(record.rating))
    if cfg.date_tags:
        d = date_tag(record.year)
        if d:
            special.append(d)

    fixed_groups = [
        [h.strip() for h in record.head if h.strip()],
        [norm(t) for t in people],
        [norm(t) for t in tags.get("character", [])],
        [norm(t) for t in tags.get("copyright", [])],
        [norm(t) for t in tags.get("artist", [])],
        special,
    ]
    seen: set[str] = set()
    fixed: list[str] = []
    for grp in fixed_groups:
        for t in grp:
            if t and t not in seen:
                seen.add(t)
                fixed.append(t)
    gen: list[str] = []
    for t in general:
        n = norm(t)
        if n and n not in seen:
            seen.add(n)
            gen.append(n)
    nl = record.caption.strip() if record.caption and record.caption.strip() else None
    return CaptionParts(tuple(fixed), tuple(gen), nl)


def sample_caption(parts: CaptionParts, cfg: CaptionConfig, rng: np.random.Generator) -> str:
    """Apply the per-step randomness (see module docstring for the draw order)."""
    if cfg.caption_dropout > 0 and rng.random() < cfg.caption_dropout:
        return ""
    general: Sequence[str] = parts.general
    nl = parts.nl
    if cfg.group_dropout > 0 and general and nl:
        u = rng.random()
        if u < cfg.group_dropout:
            general = ()
        elif u < 2 * cfg.group_dropout:
            nl = None
    if general:
        if cfg.shuffle_general:
            general = [general[i] for i in rng.permutation(len(general))]
        if cfg.tag_dropout > 0:
            keep = rng.random(len(general)) >= cfg.tag_dropout
            general = [t for t, k in zip(general, keep) if k]
    return parts.join(general, nl, cfg.separator)


def caption_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The caption generator for one sample of one epoch (independent of workers and ranks)."""
    return np.random.default_rng([int(seed), int(epoch), int(index), CAPTION_STREAM])


class Captioner:
    """Builds captions for a fixed list of records: same (seed, epoch, index) → same caption.

    Quality percentiles are computed over all ``records`` at construction
    (pass ``quality`` to reuse thresholds computed on a bigger set, e.g. for
    streamed shards).
    """

    def __init__(
        self,
        records: Sequence[SampleRecord] | None = None,
        cfg: CaptionConfig = CaptionConfig(),
        seed: int = 0,
        quality: QualityThresholds | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.seed = seed
        if quality is None and records is not None and cfg.quality_tags:
            quality = QualityThresholds.from_records(records)
        self.quality = quality

    def parts(self, record: SampleRecord) -> CaptionParts:
        return caption_parts(record, self.cfg, self.quality)

    def __call__(self, record: SampleRecord, epoch: int = 0, index: int = 0) -> str:
        return sample_caption(self.parts(record), self.cfg, caption_rng(self.seed, epoch, index))

    def fixed(self, record: SampleRecord) -> str:
        """The caption without any randomness (what a text-encoder cache stores)."""
        p = self.parts(record)
        return p.join(p.general, p.nl, self.cfg.separator)

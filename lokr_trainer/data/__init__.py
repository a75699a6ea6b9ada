"""Images and captions → training batches (DESIGN.md §7).

Modules, one job each:
    records   the :class:`SampleRecord` every source produces
    sources   folder + sidecars, JSONL manifest, webdataset tar shards
    images    robust decoding (bad files → BadImageError), crop/resize, SkipLog
    buckets   aspect-ratio buckets, resize-to-cover, crop plans and time ids
    tags      Kohaku XL captions: special tags, order, shuffle, dropouts
    dataset   indexing, the map-style dataset, collation
    sampler   one-bucket batches dealt evenly to ranks, deterministic
    stream    bucketed batches streamed from tar shards
    stats     dataset statistics (``python -m lokr_trainer.data``)

No model code: VAE / text-encoder encoding and the latent / text caches are
in :mod:`lokr_trainer.train.encode`; :class:`BucketDataset` takes any latent
cache with ``.lookup(record, plan)``.
"""

from lokr_trainer.data.buckets import Bucket, BucketConfig, BucketSet, CropPlan, make_buckets, plan_crop
from lokr_trainer.data.dataset import BucketDataset, ImageConfig, IndexedRecords, collate, index_records
from lokr_trainer.data.images import DecodeOptions, SkipLog, decode_image, load_cropped, probe_size
from lokr_trainer.data.records import SampleRecord
from lokr_trainer.data.sampler import BucketBatchSampler
from lokr_trainer.data.sources import FolderSource, ManifestSource, WebDatasetSource, open_source
from lokr_trainer.data.tags import CaptionConfig, Captioner, QualityThresholds

__all__ = [
    "Bucket",
    "BucketBatchSampler",
    "BucketConfig",
    "BucketDataset",
    "BucketSet",
    "CaptionConfig",
    "Captioner",
    "CropPlan",
    "DecodeOptions",
    "FolderSource",
    "ImageConfig",
    "IndexedRecords",
    "ManifestSource",
    "QualityThresholds",
    "SampleRecord",
    "SkipLog",
    "WebDatasetSource",
    "collate",
    "decode_image",
    "index_records",
    "load_cropped",
    "make_buckets",
    "open_source",
    "plan_crop",
    "probe_size",
]

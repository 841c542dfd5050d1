"""Built-in data sets: how each becomes SUMI samples and which extraction strategies suit it.

The strategies are the multi-scale extraction of docs/paper.md section 2.1 chosen per data set
(a DECIDE point, see docs/design.md): a long recent sequence, behaviour-specific sequences
where the log has several behaviours, and a short recent sequence for short-term intent.
"""

from __future__ import annotations

from dataclasses import dataclass

from climber.config import PrepareConfig

# how `climber prepare PATH --format F` reads a path (climber/data/readers.py: read_source)
FORMATS = ("s3rec", "recbole", "csv", "parquet", "kuairand")


@dataclass(frozen=True)
class DatasetSpec:
    prepare: PrepareConfig
    strategies: tuple[str, ...]
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        PrepareConfig(request_gap=60, max_candidates=20),
        ("recent", "pos:like", "neg:like", "recent@16"),
        "MovieLens-100K ratings; like = rating >= 4; a request = ratings <= 60 s apart (<= 20)",
    ),
    "kuairand": DatasetSpec(
        PrepareConfig(request_gap=300, max_candidates=20),
        ("recent", "pos:click", "pos:long_view", "neg:like"),
        "KuaiRand subset; tasks click, long_view, like; a request = impressions <= 5 min apart",
    ),
    "lastfm": DatasetSpec(
        PrepareConfig(request_gap=0, max_candidates=1, negatives=4),
        ("recent", "recent@16", "recent@4"),
        "S3-Rec LastFM sequences (implicit); each interaction + 4 sampled negatives",
    ),
    "beauty": DatasetSpec(
        PrepareConfig(request_gap=0, max_candidates=1, negatives=4),
        ("recent", "recent@16", "recent@4"),
        "S3-Rec Amazon Beauty sequences (implicit); each interaction + 4 sampled negatives",
    ),
    "grocery": DatasetSpec(
        PrepareConfig(request_gap=0, max_candidates=20, negatives=4),
        ("recent", "recent@16", "recent@4"),
        "Amazon Grocery (implicit, day timestamps); same-day purchases form a request, 4 negatives each",
    ),
}

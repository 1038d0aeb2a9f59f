"""The dataset check run before training: every fault, each with its file, in one report.

Small style sets fail in boring ways that trainers only reveal hours later (or never): a truncated
download, a caption saved next to the wrong file, the same picture twice, a thumbnail blown up to 1024
px, one portrait image alone in its aspect bucket. `check_dataset` finds them all at once and never stops
at the first; `require_clean` turns the errors into one WorkbenchError that lists them.

Errors (training refuses): unreadable image or caption file, missing/empty caption with nothing to fill
it (no trigger, no kohya folder tokens), metadata naming a missing file or not parseable, the same
image twice (identical file or identical pixels: it silently doubles that image's weight; raise its
repeats instead), an image that must be enlarged more than 4x to fill its bucket, no images at all.
Warnings (reported, training goes on, as kohya would): caption filled from the trigger or folder name,
enlargement over 2x, an image alone in its bucket, near-duplicates, ignored files/folders, extra lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from workbench.errors import WorkbenchError
from workbench.train.buckets import (Bucket, as_size, assign_bucket, bucket_counts, buckets_for,
                                     upscale_factor)
from workbench.train.dataset import (DatasetProblem, Example, format_problems, scan_dataset)

TOO_SMALL_WARN = 2.0  # enlargement above this looks soft
TOO_SMALL_ERROR = 4.0  # above this the image is almost surely a thumbnail by mistake
NEAR_DUPLICATE_LEVELS = 3.0  # mean abs difference of 16x16 thumbnails (0-255) for "near-duplicate"
NEAR_DUPLICATE_SHARE = 0.25  # ... and at most this share of the thumbnails' own contrast

__all__ = ["DatasetProblem", "DatasetReport", "check_dataset", "require_clean", "bucket_info"]


@dataclass
class DatasetReport:
    """What the check found; `examples` holds only the usable images."""

    path: Path
    layout: str
    examples: list[Example]
    problems: list[DatasetProblem]
    buckets: list[Bucket]
    bucket_ids: list[int]  # per example, index into `buckets`
    resolution: Bucket
    bucketing: bool
    bucket_counts: dict[Bucket, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[DatasetProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[DatasetProblem]:
        return [p for p in self.problems if p.severity != "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def images_per_epoch(self) -> int:
        return sum(e.repeats for e in self.examples)

    def render(self) -> str:
        """A short human report: counts, buckets, then errors and warnings with their files."""
        res = f"{self.resolution[0]}x{self.resolution[1]}"
        lines = [f"dataset {self.path} ({self.layout} layout): {len(self.examples)} usable images, "
                 f"{self.images_per_epoch} per epoch with repeats, resolution {res}"]
        if self.bucket_counts:
            what = "buckets" if self.bucketing else "bucketing off, one size"
            lines.append(f"{what}: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n
                                                 in self.bucket_counts.items()))
        for title, items in (("errors", self.errors), ("warnings", self.warnings)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.append(format_problems(items))
        if not self.problems:
            lines.append("no problems found")
        return "\n".join(lines)


def _near_pairs(thumbs: list[bytes]) -> dict[int, int]:
    """index -> earlier index it nearly equals.

    Near means: thumbnails differ by at most NEAR_DUPLICATE_LEVELS on average AND by much less than
    the pictures' own contrast (fine textures average to flat grey in a thumbnail and would all match).
    """
    import numpy as np

    if len(thumbs) < 2:
        return {}
    t = np.stack([np.frombuffer(b, dtype=np.uint8) for b in thumbs]).astype(np.float32)
    spread = np.abs(t - t.mean(axis=1, keepdims=True)).mean(axis=1)
    out: dict[int, int] = {}
    for i in range(1, len(t)):
        diff = np.abs(t[:i] - t[i]).mean(axis=1)
        limit = np.minimum(NEAR_DUPLICATE_LEVELS, NEAR_DUPLICATE_SHARE * (spread[:i] + spread[i]) / 2)
        hits = np.nonzero(diff <= limit + 1e-6)[0]
        if hits.size:
            out[i] = int(hits[diff[hits].argmin()])
    return out


def _duplicates(examples: Sequence[Example], fingerprints: dict[Path, tuple[str, bytes]]
                ) -> list[DatasetProblem]:
    """Exact copies (same bytes or same pixels) are errors; near-identical pictures are warnings."""
    problems: list[DatasetProblem] = []
    first_by_file: dict[str, Path] = {}
    first_by_pixels: dict[str, Path] = {}
    unique: list[Example] = []
    for e in examples:
        pix = fingerprints.get(e.image_path, ("", b""))[0]
        if e.sha256 in first_by_file:
            problems.append(DatasetProblem(e.image_path, "duplicate", "same file content as "
                                           f"{first_by_file[e.sha256]}; remove one copy (to train "
                                           "an image more often, raise its folder's repeats)"))
            continue
        first_by_file[e.sha256] = e.image_path
        if pix and pix in first_by_pixels:
            problems.append(DatasetProblem(e.image_path, "duplicate", "same pixels as "
                                           f"{first_by_pixels[pix]} (a re-saved copy); remove one"))
            continue
        if pix:
            first_by_pixels[pix] = e.image_path
        unique.append(e)
    with_thumbs = [e for e in unique if fingerprints.get(e.image_path, ("", b""))[1]]
    near = _near_pairs([fingerprints[e.image_path][1] for e in with_thumbs])
    for i, j in near.items():
        problems.append(DatasetProblem(with_thumbs[i].image_path, "near_duplicate", "looks almost "
                                       f"the same as {with_thumbs[j].image_path}; check that both "
                                       "are wanted", "warning"))
    return problems


def _size_problems(examples: Sequence[Example], bucket_ids: Sequence[int],
                   buckets: Sequence[Bucket]) -> list[DatasetProblem]:
    problems = []
    for e, b in zip(examples, bucket_ids):
        bw, bh = buckets[b]
        factor = upscale_factor(e.width, e.height, buckets[b])
        if factor <= TOO_SMALL_WARN:
            continue
        severe = factor > TOO_SMALL_ERROR
        limit = TOO_SMALL_ERROR if severe else TOO_SMALL_WARN
        problems.append(DatasetProblem(
            e.image_path, "too_small",
            f"{e.width}x{e.height} would be enlarged {factor:.1f}x (more than {limit:g}x) to fill "
            f"its {bw}x{bh} bucket; use a larger image or a lower `resolution`",
            "error" if severe else "warning"))
    return problems


def _lonely(examples: Sequence[Example], bucket_ids: Sequence[int],
            buckets: Sequence[Bucket]) -> list[DatasetProblem]:
    """An image alone in its bucket always trains in a batch of its own and skews that bucket."""
    if len(examples) < 2:
        return []
    counts: dict[int, int] = {}
    for b in bucket_ids:
        counts[b] = counts.get(b, 0) + 1
    return [DatasetProblem(e.image_path, "lonely_bucket",
                           f"the only image ({e.width}x{e.height}) in aspect bucket "
                           f"{buckets[b][0]}x{buckets[b][1]}: it always trains in a batch of its own; "
                           "add images of that shape or crop it to a common one", "warning")
            for e, b in zip(examples, bucket_ids) if counts[b] == 1]


def check_dataset(path: str | Path, *, resolution: int | Sequence[int], bucketing: bool = True,
                  min_bucket_reso: int = 256, max_bucket_reso: int = 1024,
                  caption_extension: str | None = None, trigger: str | None = None,
                  cache_dir: Path | None = None, step: int = 64) -> DatasetReport:
    """Scan the dataset, assign buckets and collect every problem; raises only for an unusable folder
    (missing, or a Hugging Face dataset that cannot be opened)."""
    scan = scan_dataset(path, caption_extension=caption_extension, trigger=trigger,
                        cache_dir=cache_dir)
    buckets = buckets_for(resolution, bucketing=bucketing, min_reso=min_bucket_reso,
                          max_reso=max_bucket_reso, step=step)
    problems = list(scan.problems)
    problems += _duplicates(scan.examples, scan.fingerprints)
    dup_paths = {p.path for p in problems if p.kind == "duplicate"}
    examples = [e for e in scan.examples if e.image_path not in dup_paths]
    ids = [assign_bucket(e.width, e.height, buckets) for e in examples]
    problems += _size_problems(examples, ids, buckets)
    if bucketing:
        problems += _lonely(examples, ids, buckets)
    return DatasetReport(scan.path, scan.layout, examples, problems, buckets, ids,
                         as_size(resolution), bucketing, bucket_counts(ids, buckets))


def require_clean(report: DatasetReport, *, strict: bool = False) -> DatasetReport:
    """Return the report when training may start; else one WorkbenchError listing every error (and,
    with `strict`, every warning), each with its file."""
    stop = report.problems if strict else report.errors
    if stop:
        raise WorkbenchError(f"dataset {report.path} is not ready for training "
                             f"({len(stop)} problem(s)):\n{format_problems(stop)}")
    return report


def bucket_info(report: DatasetReport) -> dict:
    """kohya's `ss_bucket_info` shape: buckets with their image counts (repeats included) and the mean
    aspect-ratio error, which tells how much cropping bucketing still needed."""
    counts: dict[int, int] = {}
    error = 0.0
    for e, b in zip(report.examples, report.bucket_ids):
        counts[b] = counts.get(b, 0) + e.repeats
        bw, bh = report.buckets[b]
        error += abs(bw / bh - e.width / e.height)
    return {"buckets": {str(n): {"resolution": list(report.buckets[b]), "count": counts[b]}
                        for n, b in enumerate(sorted(counts))},
            "mean_img_ar_error": error / len(report.examples) if report.examples else 0.0}

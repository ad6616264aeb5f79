"""Groups given by the user (``--groups=CSV``) and the split's leakage check.

A groups CSV (columns ``path,group_id``) says which tiles are copies of one original, or come from
one slide or patient; the group becomes the tile's pseudo-slide, so splits keep it whole. The
leakage check counts the val/test tiles that have a near-copy (a near-duplicate link, see
``convert.neardup``) in the training data under the chosen split: whatever the grouping, it says how
much of the evaluation was seen in training.

This module reads only the CSV; it opens no images and chooses no splits.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os

from kd_histo.convert.manifest import ManifestError


def read_groups(path: str, bases: list[str]) -> dict[str, str]:
    """Maps input paths to group ids from a CSV with columns ``path,group_id``.

    Args:
      path: the CSV file.
      bases: folders a relative path may be relative to (besides the CSV's own folder), e.g.
        ``--input_dir``; every resolution of a row maps to its group.

    Returns:
      ``{normalised absolute-or-joined path: group_id}``.

    Raises:
      ManifestError: missing file or columns, empty ids, a path given two groups.
    """
    if not os.path.isfile(path):
        raise ManifestError(f"groups file {path} not found; pass a CSV path,group_id to --groups")
    folders = [os.path.dirname(os.path.abspath(path)), *bases]
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns or "group_id" not in columns:
                raise ManifestError(
                    f"{path}: needs a header with 'path' and 'group_id' columns (got {columns})"
                )
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k}
                rel, gid = row.get("path", ""), row.get("group_id", "")
                if not rel or not gid:
                    raise ManifestError(
                        f"{path}:{reader.line_num}: empty path or group_id; fill both"
                    )
                fulls = [rel] if os.path.isabs(rel) else [os.path.join(b, rel) for b in folders]
                for full in fulls:
                    full = os.path.normpath(full)
                    if out.setdefault(full, gid) != gid:
                        raise ManifestError(
                            f"{path}:{reader.line_num}: {rel} is in groups {out[full]!r} and "
                            f"{gid!r}; give each file one group"
                        )
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8 CSV") from None
    return out


def apply_groups(entries: list, groups: dict[str, str], source: str) -> list:
    """The entries with ``slide_id`` = their group ("group:<id>"); slides keep their own id.

    Raises:
      ManifestError: tile inputs the groups file does not list.
    """
    missing = [e.path for e in entries if not e.is_slide and os.path.normpath(e.path) not in groups]
    if missing:
        raise ManifestError(
            f"{len(missing)} tile inputs are not in --groups={source} (e.g. {missing[0]}); "
            "list every tile with its group"
        )
    return [
        e
        if e.is_slide
        else dataclasses.replace(e, slide_id="group:" + groups[os.path.normpath(e.path)])
        for e in entries
    ]


@dataclasses.dataclass(frozen=True)
class Leakage:
    """Evaluation tiles with a near-copy in the training data, per split."""

    with_copy_in_train: dict[str, int]  # split -> tiles with a near-copy in train
    with_copy_in_training: dict[str, int]  # ... in train or unlabeled (both feed training)
    totals: dict[str, int]  # split -> tiles

    def line(self) -> str:
        """One line for the conversion's notes and output."""
        parts = []
        for s in ("val", "test"):
            if self.totals.get(s):
                n, t = self.with_copy_in_train.get(s, 0), self.totals[s]
                u = self.with_copy_in_training.get(s, 0)
                parts.append(
                    f"{n} of {t} {s} tiles ({100 * n / t:.1f}%) have a near-copy in train "
                    f"({u} in train or unlabeled)"
                )
        return "leakage check: " + ("; ".join(parts) or "no val/test tiles")


def leakage(splits: list[str], pairs: list[tuple[int, int]]) -> Leakage:
    """Counts val/test items linked by some pair to a train (or unlabeled) item.

    Args:
      splits: split name per item ("" = left out).
      pairs: near-copy links between item indices.
    """
    train, training = set(), set()
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            if splits[y] == "train":
                train.add(x)
            if splits[y] in ("train", "unlabeled"):
                training.add(x)
    totals = collections.Counter(s for s in splits if s)
    in_train = collections.Counter(splits[i] for i in train)
    in_training = collections.Counter(splits[i] for i in training)
    keep = ("val", "test")
    return Leakage(
        {s: in_train[s] for s in keep},
        {s: in_training[s] for s in keep},
        {s: totals[s] for s in keep},
    )

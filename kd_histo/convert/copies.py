"""Byte-identical tile files: copies under two labels are refused, copies under one label are kept
in one group.

A tile copied under two class folders (or given two labels in a manifest) would teach the net two
answers for one image and, split apart, score a test tile the net was trained on. Every tile file
is hashed (SHA-256 of its bytes); when copies carry different labels the conversion stops with one
line (the first pairs and a count) and lists every pair in ``<out_dir>/conflicting_duplicates.csv``
(columns ``path,label,same_bytes_as,its_label``). Copies that agree (or are unlabeled) join one
group, the group of the first copy, so the split keeps them together.

Near-copies (rotations, re-encodings) are ``convert.neardup``'s; HDF5 patches are not files and are
not compared here. This module reads bytes only; it decodes no image and chooses no split.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import os

from kd_histo.atomic import write_text
from kd_histo.convert import h5
from kd_histo.convert.errors import ConversionError
from kd_histo.convert.manifest import Entry

LIST_NAME = "conflicting_duplicates.csv"
SHOWN = 3  # pairs shown in the error line


def file_digests(paths: list[str]) -> list[str]:
    """SHA-256 of each file's bytes; "" for a file that cannot be read (its read reports it)."""
    out = []
    for path in paths:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            out.append("")
            continue
        out.append(digest.hexdigest())
    return out


def join_copies(entries: list[Entry], out_dir: str, notes: list[str], map_fn=None) -> list[Entry]:
    """``entries`` with byte-identical tiles in one group (the first copy's ``slide_id``).

    Args:
      entries: the tile entries (slides are not compared).
      out_dir: where the list of conflicting copies is written.
      notes: gets one line when copies were joined.
      map_fn: ``map_fn(fn, paths)`` as in ``convert.plan.make_plan`` (hashing in workers).

    Raises:
      ConversionError: copies carry different labels (every pair in ``out_dir``'s list file).
    """
    map_fn = map_fn or (lambda fn, paths: fn(paths))
    files = [i for i, e in enumerate(entries) if not h5.is_h5_item(e.path)]
    digests = map_fn(file_digests, [entries[i].path for i in files])
    copies: dict[str, list[int]] = collections.defaultdict(list)
    for i, d in zip(files, digests):
        if d:
            copies[d].append(i)
    sets = [[entries[i] for i in idx] for idx in copies.values() if len(idx) > 1]
    _refuse_conflicts(sets, out_dir)
    group = {e.slide_id: e.slide_id for e in entries}

    def root(s: str) -> str:
        while group[s] != s:
            group[s] = group[group[s]]
            s = group[s]
        return s

    for same in sets:  # union of the copies' groups, the smallest id naming the union
        ids = sorted({root(e.slide_id) for e in same})
        for s in ids[1:]:
            group[s] = ids[0]
    joined = [dataclasses.replace(e, slide_id=root(e.slide_id)) for e in entries]
    if sets:
        notes.append(
            f"{sum(len(s) for s in sets)} byte-identical tiles ({len(sets)} sets of copies, one "
            "label each) kept in one group per set, so one split"
        )
    return joined


def _refuse_conflicts(sets: list[list[Entry]], out_dir: str) -> None:
    pairs = [
        (same[0], e)
        for same in sets
        for e in same[1:]
        if e.label is not None and same[0].label is not None and e.label != same[0].label
    ]
    listed = os.path.join(out_dir, LIST_NAME)
    if not pairs:
        if os.path.isfile(listed):  # the list of an earlier, refused run: fixed since
            os.remove(listed)
        return
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["path", "label", "same_bytes_as", "its_label"])
    w.writerows([a.path, a.label, b.path, b.label] for a, b in pairs)
    os.makedirs(out_dir, exist_ok=True)
    write_text(listed, text.getvalue())
    shown = "; ".join(f"{a.path} ({a.label}) = {b.path} ({b.label})" for a, b in pairs[:SHOWN])
    more = f"; and {len(pairs) - SHOWN} more" if len(pairs) > SHOWN else ""
    raise ConversionError(
        f"{len(pairs)} tile(s) are byte-identical copies of a tile with another label: {shown}"
        f"{more} (all listed in {listed}); keep one copy, under its right label"
    )

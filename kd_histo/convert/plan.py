"""Plans a conversion: inputs -> entries -> splits -> work units, identically in every task.

Every task of a multi-machine run computes the same plan from the same inputs and config, then
takes the units whose slide hashes to its ``task_index``; the plan is a pure function of the input
listing and the config, which is what makes resume and merging safe. (With ``group_by="phash"``
every task hashes every tile: the groups, and so the splits, need all of them; the same holds
for ``near_duplicates`` and the leakage check.)

Tile groups come from the inputs' slide ids (a manifest's ``slide_id`` column), from a groups CSV
(``--groups``), or from near-duplicate detection (``phash``, ``near_duplicates``). After the split,
a leakage check counts the val/test tiles with a near-copy in train (a note in dataset.json).

This module reads images only for the grouping and the leakage check, and slides only for their
thumbnails.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import os
import zlib

import numpy as np

from kd_histo.convert import (
    copies,
    h5,
    manifest,
    neardup,
    phash,
    qc,
    regions,
    slides,
    splits,
    tiles,
)
from kd_histo.convert import groups as groups_lib

# (the package's name 'annotations' is the __future__ feature: import the submodule's names)
from kd_histo.convert.annotations import region_outlines
from kd_histo.convert.config import ConvertConfig
from kd_histo.convert.errors import ConversionError, SkipInput
from kd_histo.convert.records import Item, Unit
from kd_histo.schema import UNLABELED


@dataclasses.dataclass
class Plan:
    """What a conversion will do."""

    class_names: list[str]
    units: list[Unit]  # all units of all tasks, in output order
    skipped: list[dict[str, str]]  # inputs left out before reading tiles
    notes: list[str]
    num_inputs: int  # files listed (tiles, slides, HDF5 patches, unsupported files)
    has_slides: bool = False
    has_tiles: bool = False
    annotations: list[dict] = dataclasses.field(default_factory=list)  # per annotated slide
    # slide path -> (class name, level-0 exterior ring [N, 2]) per region polygon (qc drawings)
    outlines: dict[str, list] = dataclasses.field(default_factory=dict)


def list_entries(cfg: ConvertConfig) -> tuple[list[manifest.Entry], list[dict[str, str]]]:
    """All inputs of ``cfg`` (folder, manifest, slides) and the files skipped while listing."""
    entries, skipped = [], []
    if cfg.input_dir:
        e, s = manifest.scan_folder(cfg.input_dir)
        entries += e
        skipped += s
    if cfg.manifest:
        entries += manifest.read_manifest(cfg.manifest, cfg.root or None)
    if cfg.slide_labels:
        entries += manifest.read_manifest(cfg.slide_labels, cfg.root or None, slides=True)
    if cfg.h5_images:
        entries += h5.list_h5(cfg.h5_images, cfg.h5_labels, cfg.encode.h5_key, cfg.h5_labels_key)
    listed = {e.path for e in entries}
    for spec in cfg.slides:
        paths = (
            sorted(glob.glob(os.path.join(spec, "*")))
            if os.path.isdir(spec)
            else sorted(glob.glob(spec))
        )
        if not paths:
            raise ConversionError(
                f"--slides {spec} matches no file; give slide files, a folder or a glob"
            )
        for p in paths:
            p = os.path.normpath(p)
            if not manifest.is_utf8(p):
                skipped.append({"path": manifest.printable(p), "reason": manifest.NOT_UTF8})
            elif p not in listed and os.path.isfile(p):
                listed.add(p)
                entries.append(
                    manifest.Entry(p, None, os.path.splitext(os.path.basename(p))[0], is_slide=True)
                )
    if not entries:
        raise ConversionError(
            "no inputs: pass --input_dir, --manifest, --slides, --slide_labels or --h5_images"
        )
    seen = set()
    for e in entries:
        if e.path in seen:
            raise manifest.ManifestError(
                f"{e.path} is listed twice (folder, manifest or slides); list each file once"
            )
        seen.add(e.path)
    return entries, skipped


GROUP_BY = ("slide", "phash", "near_duplicates")
LEAKAGE_CHECK_MAX_TILES = 50_000  # the check compares all pairs of tiles: O(N^2)


def make_plan(cfg: ConvertConfig, map_fn=None) -> Plan:
    """Builds the plan of ``cfg``.

    Args:
      cfg: the conversion config.
      map_fn: ``map_fn(fn, paths)`` applies a picklable per-chunk function to a list of paths and
        returns the concatenated results (lets the caller read tiles in worker processes);
        default reads them here.
    """
    map_fn = map_fn or (lambda fn, paths: fn(paths))
    entries, skipped = list_entries(cfg)
    num_inputs = len(entries) + len(skipped)  # listed inputs, including unsupported files
    notes: list[str] = []
    anns = regions.read_slide_annotations(cfg.annotations, entries)
    class_names = _class_names(cfg, entries, anns, notes)
    index = {n: i for i, n in enumerate(class_names)}
    tile_entries = _group_tiles(cfg, entries, skipped, notes, map_fn)
    tile_entries = copies.join_copies(tile_entries, cfg.out_dir, notes, map_fn)
    tile_entries, near = _near_duplicates(cfg, tile_entries, index, skipped, notes, map_fn)
    outlines = {p: region_outlines(a) for p, a in anns.items()}
    slide_plans = _plan_slides(cfg, entries, skipped, notes, outlines)
    rules = regions.LabelRules(
        cfg.min_annotation_overlap, cfg.unannotated, tuple(cfg.ignore_classes)
    )
    tile_labels, ann_records = regions.label_slides(slide_plans, anns, index, rules, notes)
    slide_entries = [e for e in entries if e.is_slide and e.path in slide_plans]
    items = tile_entries + slide_entries
    labels = [_entry_label(e, index, tile_labels) for e in items]
    chosen = _split(cfg, items, labels, slide_plans, tile_labels, near, skipped, notes)
    units = _make_units(cfg, items, labels, chosen, slide_plans, tile_labels, notes)
    return Plan(
        class_names,
        units,
        skipped,
        notes,
        num_inputs,
        bool(slide_entries),
        bool(tile_entries),
        ann_records,
        outlines,
    )


def _class_names(cfg, entries, anns, notes: list[str]) -> list[str]:
    region_classes = {
        n
        for a in anns.values()
        for n in a.class_names
        if not regions.is_ignore_class(n, cfg.ignore_classes)
    }
    class_names = manifest.class_names_of(
        entries,
        list(cfg.class_names) or None,
        sorted(region_classes),
        one_class=cfg.allow_one_class,
    )
    if not class_names:
        class_names = ["unknown"]
        notes.append(
            "no labeled inputs: class_names is a placeholder; pass --class_names to match a teacher"
        )
    return class_names


def _group_tiles(cfg, entries, skipped, notes, map_fn) -> list[manifest.Entry]:
    """The tile entries with their groups (``--groups`` or ``--group_by=phash``)."""
    if cfg.group_by not in GROUP_BY:
        raise ConversionError(
            f"group_by must be one of {', '.join(GROUP_BY)}, got {cfg.group_by!r}"
        )
    if cfg.groups and cfg.group_by != "slide":
        raise ConversionError(
            f"--groups gives the groups; drop --group_by={cfg.group_by} (or drop --groups)"
        )
    tile_entries = [e for e in entries if not e.is_slide]
    if cfg.groups:
        table = groups_lib.read_groups(cfg.groups, [cfg.input_dir] if cfg.input_dir else [])
        tile_entries = groups_lib.apply_groups(tile_entries, table, cfg.groups)
        notes.append(
            f"groups from {cfg.groups}: {len(tile_entries)} tiles in "
            f"{len({e.slide_id for e in tile_entries})} groups"
        )
    if cfg.group_by != "slide" and any(h5.is_h5_item(e.path) for e in tile_entries):
        raise ConversionError(
            f"--group_by={cfg.group_by} reads files by path; use --group_by=slide with --h5_images"
        )
    if cfg.group_by == "phash" and tile_entries:
        tile_entries, hash_skips, n_groups = _group_by_phash(
            tile_entries, cfg.phash_distance, functools.partial(map_fn, hash_paths)
        )
        skipped += hash_skips
        notes.append(
            f"group_by=phash: {len(tile_entries)} tiles in {n_groups} near-duplicate groups "
            f"(max distance {cfg.phash_distance} bits of 64)"
        )
    return tile_entries


def _near_duplicates(cfg, tile_entries, index, skipped, notes, map_fn):
    """Near-duplicate groups (``--group_by=near_duplicates``) and the leakage check's links.

    Returns:
      The tile entries (regrouped), and (tile entries, their near-copy links) or None.
    """
    check = (
        cfg.leakage_check
        and 1 < len(tile_entries) <= LEAKAGE_CHECK_MAX_TILES
        and not any(h5.is_h5_item(e.path) for e in tile_entries)
    )
    if not (cfg.group_by == "near_duplicates" or check):
        if cfg.leakage_check and len(tile_entries) > LEAKAGE_CHECK_MAX_TILES:
            notes.append(
                f"leakage check skipped: {len(tile_entries)} tiles > {LEAKAGE_CHECK_MAX_TILES}"
            )
        return tile_entries, None
    sig_results = map_fn(
        functools.partial(signature_paths, opts=cfg.neardup, max_pixels=cfg.encode.max_pixels),
        [e.path for e in tile_entries],
    )
    kept, sigs = [], []
    for e, r in zip(tile_entries, sig_results):
        if not isinstance(r, SkipInput):
            kept.append(e)
            sigs.append(r)
        elif cfg.group_by == "near_duplicates":  # else the tile's unit reports it
            skipped.append({"path": e.path, "reason": str(r)})
    if cfg.group_by == "near_duplicates":
        tile_entries = kept
    tile_labels = [index[e.label] if e.label is not None else UNLABELED for e in kept]
    links = neardup.near_pairs(sigs, tile_labels, cfg.neardup)
    near = (kept, links)
    if cfg.group_by == "near_duplicates" and kept:
        found = neardup.group_near_duplicates(sigs, tile_labels, cfg.neardup, links)
        # The pseudo-slide is the group; the patient keeps any id the manifest gave.
        tile_entries = [
            dataclasses.replace(e, slide_id=f"neardup-{g:05d}") for e, g in zip(kept, found)
        ]
        near = (tile_entries, links)
        largest = int(max(collections.Counter(found.tolist()).values()))
        notes.append(
            f"group_by=near_duplicates: {len(kept)} tiles in {int(found.max()) + 1} "
            f"near-duplicate groups (largest {largest} tiles)"
        )
    return tile_entries, near


def _plan_slides(cfg, entries, skipped, notes, outlines) -> dict[str, slides.SlidePlan]:
    """Each slide's tissue grid; its qc picture (with the outlines of its annotation regions)."""
    slide_plans = {}
    for e in entries:
        if e.is_slide:
            try:
                sp = slides.plan_slide(
                    e.path,
                    cfg.encode.tile_px,
                    cfg.encode.target_mpp,
                    min_tissue=cfg.encode.min_tissue,
                    slide_mpp=cfg.slide_mpp,
                    tissue_method=cfg.encode.tissue_method,
                    min_tissue_area=cfg.encode.min_tissue_area,
                    keep_thumbnail=cfg.qc,
                )
                if cfg.qc and task_of(e.slide_id, cfg.num_tasks) == cfg.task_index:
                    qc.write_slide_qc(
                        cfg.out_dir, e.slide_id, sp, qc.by_class(outlines.get(e.path))
                    )
                slide_plans[e.path] = dataclasses.replace(sp, thumbnail=None)
            except SkipInput as err:
                if cfg.encode.strict:
                    raise ConversionError(f"{e.path}: {err} (--strict)") from None
                skipped.append({"path": e.path, "reason": str(err)})
    for p, sp in slide_plans.items():
        notes.append(
            f"{os.path.basename(p)}: {len(sp.coords)} of {sp.grid_tiles} grid tiles have tissue "
            "on the "
            f"thumbnail (level-0 {sp.base_mpp:g} µm/px, tile {sp.size_l0} px at level 0; tissue "
            f"by {sp.tissue_method}, chroma threshold {sp.tissue_threshold}, "
            f"{sp.tissue_fraction:.1%} of the thumbnail)"
        )
    return slide_plans


def _entry_label(e: manifest.Entry, index: dict[str, int], tile_labels) -> int:
    """An input's class for the split: its label, or an annotated slide's most frequent class."""
    if e.path in tile_labels:
        lab = tile_labels[e.path]
        lab = lab[lab >= 0]
        return int(np.bincount(lab).argmax()) if lab.size else UNLABELED
    return index[e.label] if e.label is not None else UNLABELED


def _split(cfg, items, labels, slide_plans, tile_labels, near, skipped, notes) -> list[str]:
    """The split of each input (slide- and patient-disjoint), with the leakage check's note."""

    def weight(e) -> int:
        if not e.is_slide:
            return 1
        if e.path in tile_labels:
            return int((tile_labels[e.path] != regions.DROPPED).sum())
        return len(slide_plans[e.path].coords)

    chosen = splits.assign_splits(
        [e.slide_id for e in items],
        [e.patient_id for e in items],
        labels,
        cfg.fractions,
        cfg.seed,
        [e.split for e in items],
        [weight(e) for e in items],
    )
    if near is not None:
        split_of = {e.path: s for e, s in zip(items, chosen)}
        leak = groups_lib.leakage([split_of.get(e.path, "") for e in near[0]], near[1])
        notes.append(leak.line() + f" (near_duplicates links, group_by={cfg.group_by})")
    for e, s in zip(items, chosen):
        if not s:
            skipped.append(
                {
                    "path": e.path,
                    "reason": "unlabeled input on a val/test slide/patient (kept out of training)",
                }
            )
    return chosen


def _make_units(cfg, items, labels, chosen, slide_plans, tile_labels, notes) -> list[Unit]:
    """Units: per split, per task (by slide), chunks of unit_size tiles, in a fixed order."""
    per_key: dict[tuple[str, int], list[Item]] = {}
    held_out = sum(1 for lab, s in zip(labels, chosen) if s == "unlabeled" and lab != UNLABELED)
    if held_out:
        notes.append(
            f"split_fractions: {held_out} labeled inputs held out as 'unlabeled' (labels dropped, "
            "groups disjoint from val/test)"
        )
    left_out = 0
    for e, lab, s in zip(items, labels, chosen):
        if not s:
            continue
        if s == "unlabeled":  # includes labeled groups held out by a 4th split share
            lab = UNLABELED
        task = task_of(e.slide_id, cfg.num_tasks)
        if not e.is_slide:
            per_key.setdefault((s, task), []).append(Item(e.path, lab, e.slide_id, e.patient_id))
            continue
        sp = slide_plans[e.path]
        per_tile = tile_labels.get(e.path)
        for k, (x, y) in enumerate(sp.coords):
            split, tile_lab = s, lab
            if per_tile is not None:
                tile_lab = per_tile[k]
                if tile_lab == regions.DROPPED:
                    continue
                if s == "unlabeled" or tile_lab == UNLABELED:
                    tile_lab = UNLABELED
                    if s not in ("train", "unlabeled"):  # unlabeled tissue of an evaluation slide
                        left_out += 1
                        continue
                    split = "unlabeled"
            per_key.setdefault((split, task), []).append(
                Item(e.path, int(tile_lab), e.slide_id, e.patient_id, x, y, sp.size_l0)
            )
    if left_out:
        notes.append(
            f"annotations: {left_out} unannotated tiles of val/test slides left out "
            "(kept out of training)"
        )
    units = []
    for s, task in sorted(per_key, key=lambda k: (manifest.SPLITS.index(k[0]), k[1])):
        bucket = per_key[(s, task)]
        for c in range(0, len(bucket), cfg.unit_size):
            units.append(
                Unit(
                    f"{s}-t{task:05d}-u{c // cfg.unit_size:06d}",
                    s,
                    tuple(bucket[c : c + cfg.unit_size]),
                )
            )
    return units


def task_of(slide_id: str, num_tasks: int) -> int:
    """The task that converts the tiles of ``slide_id`` (and writes its qc picture)."""
    return zlib.crc32(slide_id.encode()) % num_tasks


def unit_task(unit: Unit) -> int:
    """The task index encoded in a unit id."""
    return int(unit.unit_id.split("-t")[1].split("-")[0])


def hash_paths(paths: list[str], max_pixels: int = tiles.DEFAULT_MAX_PIXELS) -> list:
    """pHash variants of each file, or the SkipInput that stopped reading it (picklable)."""
    out = []
    for p in paths:
        try:
            out.append(phash.phash_variants(tiles.read_tile(p, max_pixels=max_pixels)[0]))
        except SkipInput as e:
            out.append(e)
    return out


def signature_paths(
    paths: list[str], opts: neardup.NearDupOptions, max_pixels: int = tiles.DEFAULT_MAX_PIXELS
) -> list:
    """Near-duplicate signatures of each file, or the SkipInput that stopped reading it."""
    out = []
    for p in paths:
        try:
            out.append(neardup.signature(tiles.read_tile(p, max_pixels=max_pixels)[0], opts))
        except SkipInput as e:
            out.append(e)
    return out


def _group_by_phash(entries, distance, hash_fn):
    results = hash_fn([e.path for e in entries])
    kept, hashes, skipped = [], [], []
    for e, h in zip(entries, results):
        if isinstance(h, SkipInput):
            skipped.append({"path": e.path, "reason": str(h)})
        else:
            kept.append(e)
            hashes.append(h)
    if not kept:
        return kept, skipped, 0
    groups = phash.group_by_hash(np.stack(hashes), distance)
    # The pseudo-slide is the group; the patient keeps any id the manifest gave.
    kept = [dataclasses.replace(e, slide_id=f"phash-{g:05d}") for e, g in zip(kept, groups)]
    return kept, skipped, int(groups.max()) + 1

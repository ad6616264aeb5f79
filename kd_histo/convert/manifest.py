"""Lists conversion inputs: a CSV manifest, a folder of class subfolders, or slide files.

Every input becomes an :class:`Entry` (path, label name or None for unlabeled, slide id, patient id,
optional split). Problems that make the whole listing wrong (missing folder or columns, duplicate
paths, unknown labels, empty classes, paths escaping ``root``) raise :class:`ManifestError` with a
one-line fix; files of unsupported types inside a folder are returned as skips instead.

This module does not open images or slides and does not choose splits (see ``convert.splits``).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import os

from kd_histo.atomic import replacing
from kd_histo.convert.errors import ConversionError
from kd_histo.convert.tiles import TILE_EXTENSIONS

SPLITS = ("train", "val", "test", "unlabeled")
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
UNLABELED_FOLDER = "unlabeled"
# The header names a manifest may use; any other column is refused (a misspelt "Label" once
# dropped every label, silently).
COLUMNS = ("path", "label", "slide_id", "patient_id", "split")


class ManifestError(ConversionError):
    """The manifest or folder listing is unusable; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One input file (a tile image, or a whole slide when ``is_slide``)."""

    path: str
    label: str | None  # class name; None = unlabeled
    slide_id: str
    patient_id: str = ""
    split: str = ""  # "" = chosen by convert.splits
    is_slide: bool = False


def read_manifest(path: str, root: str | None = None, slides: bool = False) -> list[Entry]:
    """Reads a CSV manifest with columns ``path,label[,slide_id][,patient_id][,split]``.

    Relative paths are relative to the manifest's folder. An empty label means unlabeled; an
    empty slide_id defaults to the file stem (one pseudo-slide per tile).

    Args:
      path: the CSV file.
      root: when set, every listed path must resolve inside this folder.
      slides: treat every row as a whole-slide image (slide label CSVs); otherwise rows whose
        extension is a slide format are slides and the rest are tiles.

    Raises:
      ManifestError: missing file/columns, not UTF-8 CSV, rows with surplus fields, empty or
        duplicate paths, bad split names, paths escaping ``root``, a label that contradicts the
        file's folder when that folder is named as a class.
    """
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path} not found; pass an existing CSV file to --manifest")
    base = os.path.dirname(os.path.abspath(path))
    if root and not os.path.isdir(root):
        raise ManifestError(f"--root={root} is not a folder; pass the folder paths must stay in")
    root_abs = os.path.realpath(root) if root else None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _read_rows(path, csv.DictReader(f), base, root, root_abs, slides)
    except UnicodeDecodeError as e:
        raise ManifestError(
            f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the manifest as UTF-8 CSV"
        ) from None
    except csv.Error as e:
        raise ManifestError(f"{path}: not a readable CSV ({e}); fix the file") from None


def _read_rows(path, reader, base, root, root_abs, slides) -> list[Entry]:
    """The entries of an open manifest (``read_manifest`` without the file handling)."""
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "path" not in columns:
        raise ManifestError(
            f"{path}: needs a header row with a 'path' column (got {columns or 'no header'})"
        )
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        hints = [
            f"{c!r} (did you mean {close[0]!r}?)" if close else repr(c)
            for c in unknown
            for close in [difflib.get_close_matches(c.lower(), COLUMNS, n=1, cutoff=0.6)]
        ]
        raise ManifestError(
            f"{path}: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(hints)} in the "
            f"header; the columns are {','.join(COLUMNS)} (lower case)"
        )
    entries, seen = [], {}
    for row in reader:
        line = reader.line_num  # the file's line (a quoted field may span several)
        if None in row:  # csv.DictReader files surplus fields under the key None
            raise ManifestError(
                f"{path}:{line}: {len(columns) + len(row[None])} fields but the header has "
                f"{len(columns)}; quote fields that contain commas"
            )
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        rel = row.get("path", "")
        if not rel:
            raise ManifestError(f"{path}:{line}: empty path; every row needs a file path")
        if "\x00" in rel:
            raise ManifestError(f"{path}:{line}: the path holds a NUL character; fix the row")
        full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(base, rel))
        if root_abs and os.path.commonpath([root_abs, os.path.realpath(full)]) != root_abs:
            raise ManifestError(
                f"{path}:{line}: {rel} lies outside --root={root}; fix the path or the root"
            )
        if full in seen:
            raise ManifestError(
                f"{path}:{line}: duplicate path {rel} (first on line {seen[full]}); "
                "list each file once"
            )
        seen[full] = line
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise ManifestError(f"{path}:{line}: split {split!r} is not one of {', '.join(SPLITS)}")
        stem = os.path.splitext(os.path.basename(full))[0]
        is_slide = slides or os.path.splitext(full)[1].lower() in SLIDE_EXTENSIONS
        entries.append(
            Entry(
                full,
                row.get("label") or None,
                row.get("slide_id") or stem,
                row.get("patient_id", ""),
                split,
                is_slide,
            )
        )
    if not entries:
        raise ManifestError(f"{path} lists no files; add rows below the header")
    _check_class_folders(path, entries, list(seen.values()))
    return entries


def _check_class_folders(path: str, entries: list[Entry], lines: list[int]) -> None:
    """A row's label must agree with the file's folder when that folder is named as a class."""
    labels = {e.label for e in entries if e.label}
    for e, line in zip(entries, lines):
        folder = os.path.basename(os.path.dirname(e.path))
        if e.label and folder in labels and folder != e.label:
            rel = os.path.join(folder, os.path.basename(e.path))
            raise ManifestError(
                f"{path}:{line}: {rel} lies in the class folder {folder!r} but is labeled "
                f"{e.label!r}; fix the label or move the file"
            )


def _same_class_spelt_twice(entries: list[Entry]) -> None:
    """Refuses labels that differ only in case or whitespace ('LUNG_ACA' beside 'lung_aca')."""
    spellings: dict[str, dict[str, str]] = {}
    for e in entries:
        if e.label is not None:
            spellings.setdefault(" ".join(e.label.split()).casefold(), {}).setdefault(
                e.label, e.path
            )
    for found in spellings.values():
        if len(found) > 1:
            (a, path_a), (b, path_b) = sorted(found.items())[:2]
            raise ManifestError(
                f"labels {a!r} ({path_a}) and {b!r} ({path_b}) differ only in case or "
                "whitespace; write each class one way (one class folder, one manifest spelling)"
            )


def scan_folder(input_dir: str) -> tuple[list[Entry], list[dict[str, str]]]:
    """Lists a folder of class subfolders (``unlabeled/`` holds unlabeled tiles).

    Returns:
      ``(entries, skipped)``: skipped lists the other files (unsupported types, side files such
      as a README) as {"path", "reason"}; only hidden files (``.name``) are passed over.

    Raises:
      ManifestError: the folder is missing, has no class subfolders, or a class folder is empty.
    """
    if not os.path.isdir(input_dir):
        raise ManifestError(
            f"input folder {input_dir} not found; pass an existing folder to --input_dir"
        )
    classes = sorted(
        d
        for d in os.listdir(input_dir)
        if os.path.isdir(os.path.join(input_dir, d)) and not d.startswith(".")
    )
    if not classes:
        raise ManifestError(
            f"{input_dir} has no class subfolders; put each class's tiles in <input_dir>/<class>/"
        )
    entries, skipped = [], []
    for name in classes:
        folder = os.path.join(input_dir, name)
        if not is_utf8(name):  # class names go into dataset.json and every record
            raise ManifestError(
                f"class folder {printable(folder)} has a name that is not UTF-8; rename it"
            )
        n_before = len(entries)
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                full = os.path.join(dirpath, fn)
                ext = os.path.splitext(fn)[1].lower()
                if not is_utf8(full):
                    skipped.append({"path": printable(full), "reason": NOT_UTF8})
                elif ext in TILE_EXTENSIONS:
                    entries.append(
                        Entry(
                            full,
                            None if name == UNLABELED_FOLDER else name,
                            os.path.splitext(fn)[0],
                        )
                    )
                elif ext in (".csv", ".json", ".txt", ".md"):
                    # Side files (manifests, READMEs) are not inputs, but nothing in a class
                    # folder is dropped without a word: they are listed like other skips.
                    skipped.append({"path": full, "reason": f"not an image (side file {ext})"})
                else:
                    skipped.append(
                        {"path": full, "reason": f"unsupported file type {ext or '(none)'}"}
                    )
        if len(entries) == n_before:
            raise ManifestError(f"class folder {folder} holds no images; remove it or add tiles")
    return entries, skipped


NOT_UTF8 = "file name is not UTF-8 (its bytes shown as \\xNN); rename the file to convert it"


def is_utf8(path: str) -> bool:
    """False for a name Python decoded with surrogate escapes (bytes that are not UTF-8)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """``path`` as text that can be printed and stored: undecodable bytes as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def class_names_of(
    entries: list[Entry],
    given: list[str] | None = None,
    extra: list[str] = (),
    one_class: bool = False,
) -> list[str]:
    """The sorted label names of ``entries`` (and ``extra``, e.g. the classes of slide regions),
    or ``given`` after checking every label is in it (labeled inputs of a single class are
    refused unless ``one_class``).

    Raises:
      ManifestError: duplicate names in ``given``, a label that is not in ``given``, labels that
        differ only in case or whitespace, or labeled inputs of one class only (nothing to tell
        apart: every accuracy would be 1.0).
    """
    _same_class_spelt_twice(entries)
    # Integer-like names (HDF5 labels, numbered classes) sort numerically: "2" before "10".
    present = sorted(
        {e.label for e in entries if e.label is not None} | set(extra),
        key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n),
    )
    if len(present) == 1 and not one_class:
        example = next((e.path for e in entries if e.label is not None), "the annotations")
        raise ManifestError(
            f"the labeled inputs hold one class, {present[0]!r} (e.g. {example}); a classifier "
            "needs at least two: add the other classes' tiles (or pass --allow_one_class, e.g. "
            "for a test cohort)"
        )
    if given:
        if len(set(given)) != len(given):
            raise ManifestError(f"--class_names has duplicates: {given}")
        unknown = [lab for lab in present if lab not in given]
        if unknown:
            raise ManifestError(
                f"labels {unknown} are not in --class_names={','.join(given)}; "
                "add them or fix the labels"
            )
        return list(given)
    return present


def write_manifest(folders: list[tuple[str, str]], path: str) -> dict[str, int]:
    """Writes one CSV manifest for several class-folder trees, each with a fixed split or none.

    Made for public sets that come as separate folders, e.g. NCT-CRC-HE-100K (train/val, split
    chosen by kd-histo-convert) beside CRC-VAL-HE-7K (the test set of other patients). Paths
    are written relative to the manifest's folder, which is how :func:`read_manifest` reads them.

    Args:
      folders: (class-folder tree, split) pairs; split "" lets the conversion choose, else one of
        :data:`SPLITS`.
      path: the CSV to write (its folder is created).

    Returns:
      Rows written per folder.

    Raises:
      ManifestError: a missing or empty folder, or an unknown split.
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    rows, counts = [], {}
    for folder, split in folders:
        if split and split not in SPLITS:
            raise ManifestError(
                f"split {split!r} for {folder} unknown; choose one of {SPLITS} or ''"
            )
        entries, _ = scan_folder(folder)
        counts[folder] = len(entries)
        for e in entries:
            rel = os.path.relpath(os.path.abspath(e.path), out_dir)
            rows.append([rel, e.label or "", e.slide_id, e.patient_id, split])
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "slide_id", "patient_id", "split"])
        w.writerows(rows)
    return counts

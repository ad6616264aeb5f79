"""The conversion's frozen configuration (built by the binary from flags, or directly in tests)."""

from __future__ import annotations

import dataclasses

from kd_histo.convert.errors import ConversionError
from kd_histo.convert.neardup import NearDupOptions
from kd_histo.convert.records import EncodeOptions
from kd_histo.numbers import require_finite
from kd_histo.progress import EVERY_S, SWITCH
from kd_histo.settings import NUM_TASKS_HELP, SLIDE_MPP_HELP, TASK_INDEX_HELP, setting


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Everything a conversion needs.

    Attributes:
      out_dir: folder for shards and dataset.json.
      input_dir: folder of class subfolders ("" = none).
      manifest: CSV manifest of tiles and/or slides ("" = none).
      slides: whole-slide image files or folders.
      slide_labels: CSV (path,label[,slide_id,patient_id,split]) of slides; "" = slides unlabeled.
      annotations: region annotation files of the slides (``convert.regions``); "" = none.
      min_annotation_overlap: a tile's area fraction inside one class's regions to get its label.
      unannotated: "unlabeled" or "drop": tiles of annotated slides outside every region.
      ignore_classes: region classes whose tiles are dropped (besides ``Ignore*``).
      root: when set, manifest paths must lie inside it.
      h5_images: HDF5 file of image patches [N, H, W, 3] (PatchCamelyon style), read with
        tensorflow-io.
      h5_labels: HDF5 file of their labels ("" = unlabeled); label names are the integer values.
      h5_labels_key: dataset name of the labels (the images' is ``encode.h5_key``).
      class_names: fixed class order (default: sorted label names).
      allow_one_class: accept labeled inputs of a single class (refused by default: a classifier
        trained on them learns nothing and scores 1.0).
      group_by: "slide" (ids as given), "near_duplicates" (augmented copies of one original
        share a pseudo-slide: rotations, flips, zooms, crops, colour shifts) or "phash" (a cheaper
        hash that misses rotations by arbitrary angles and crops).
      phash_distance: link threshold in bits for ``group_by="phash"``.
      groups: CSV (path,group_id) of tile groups (slides, patients, originals); "" = none.
      neardup: settings of the near-duplicate detection (grouping and leakage check).
      leakage_check: count val/test tiles with a near-copy in train (a note in dataset.json);
        ``group_by="near_duplicates"`` reports it regardless (its links are computed anyway).
      fractions: train/val/test shares for inputs without a manifest split, and optionally a
        4th share of labeled groups stored without labels in ``unlabeled``.
      seed: split seed.
      encode: how tiles are read and stored.
      slide_mpp: level-0 µm/px override for slides lacking it.
      compression: "" or "GZIP" for the final shards.
      examples_per_shard: target shard size when ``num_shards`` is 0.
      num_shards: shards per split (0 = from examples_per_shard).
      num_workers: worker processes (0 = in this process).
      unit_size: tiles per work unit (the resume and progress granularity).
      task_index: this task's index among ``num_tasks``.
      num_tasks: independent tasks sharing the inputs by slide; > 1 needs a final ``merge``.
      overwrite: replace an existing data set in out_dir.
      keep_parts: keep the per-unit part files after the merge.
      progress: report progress (``kd_histo.progress``: a bar on a terminal, else lines).
      qc: write ``qc/<slide>.png`` per slide (thumbnail, kept and dropped tiles, annotations).
      command: the command line recorded in dataset.json.
    """

    # --out_dir is shared by the binaries (one default per process, ""); here it is required.
    out_dir: str = setting(
        help="Output folder for shards and dataset.json (required).", flag_default=""
    )
    input_dir: str = setting("", "Folder of class subfolders (unlabeled/ = unlabeled tiles).")
    manifest: str = setting(
        "", "CSV: path,label[,slide_id][,patient_id][,split]; empty label = unlabeled."
    )
    slides: tuple[str, ...] = setting(
        (), "Whole-slide files, folders or globs (unlabeled unless in --slide_labels)."
    )
    slide_labels: str = setting("", "CSV of slides: path,label[,slide_id][,patient_id][,split].")
    annotations: str = setting(
        "",
        "Regions drawn on the slides (QuPath GeoJSON, ASAP XML): a file, folder or glob matched "
        "to slides by file stem, or a CSV slide,annotations.",
    )
    min_annotation_overlap: float = setting(
        0.5, "Fraction of a slide tile inside one class's regions for it to get that label."
    )
    unannotated: str = setting(
        "unlabeled",
        "Tissue tiles of annotated slides outside every region: kept unlabeled, or dropped.",
        choices=("unlabeled", "drop"),
    )
    ignore_classes: tuple[str, ...] = setting(
        (), "Region classes whose tiles are dropped (besides classes named Ignore*)."
    )
    root: str = setting("", "If set, manifest paths must lie inside this folder.")
    h5_images: str = setting(
        "", "HDF5 file of uint8 patches [N,H,W,3] (e.g. PatchCamelyon *_x.h5)."
    )
    h5_labels: str = setting("", "HDF5 file of their labels (e.g. *_y.h5); '' = unlabeled.")
    h5_labels_key: str = setting("y", "Dataset name of the labels in --h5_labels.")
    class_names: tuple[str, ...] = setting((), "Class order (default: sorted label names).")
    allow_one_class: bool = setting(
        False, "Accept labeled inputs of one class (e.g. a test cohort of one diagnosis)."
    )
    group_by: str = setting(
        "slide",
        "Groups kept in one split: slide ids as given (manifest slide_id, --groups), augmented "
        "copies of one original (near_duplicates: rotations, flips, zooms, crops, colour shifts), "
        "or a cheaper perceptual hash that misses arbitrary rotations and crops (phash).",
        choices=("slide", "near_duplicates", "phash"),
    )
    phash_distance: int = setting(8, "Bits (of 64) within which two tiles count as near-copies.")
    groups: str = setting(
        "", "CSV path,group_id: tiles of one group (original image, slide, patient) share a split."
    )
    neardup: NearDupOptions = NearDupOptions()
    leakage_check: bool = setting(
        True,
        "Count val/test tiles with a near-copy in train (printed, and a note in dataset.json); "
        "free with --group_by=near_duplicates, which always reports it.",
    )
    fractions: tuple[float, ...] = setting(
        (0.7, 0.15, 0.15),
        "train,val,test shares; a 4th share holds labeled groups out without labels in "
        "'unlabeled' (a label-scarce setting for distillation experiments).",
        flag="split_fractions",
    )
    seed: int = setting(0, "Split seed.")
    encode: EncodeOptions = EncodeOptions()
    slide_mpp: float = setting(0.0, SLIDE_MPP_HELP)
    compression: str = setting("", "Shard compression.", choices=("", "GZIP"))
    examples_per_shard: int = setting(1000, "Target shard size (when --num_shards=0).")
    num_shards: int = setting(0, "Shards per split (0 = from --examples_per_shard).")
    # The binary converts in parallel with a progress bar; library calls (tests, the demo)
    # in-process.
    num_workers: int = setting(0, "Worker processes (0 = in this process).", flag_default=2)
    unit_size: int = setting(64, "Tiles per work unit: the granularity of resume and progress.")
    task_index: int = setting(0, TASK_INDEX_HELP)
    num_tasks: int = setting(1, NUM_TASKS_HELP)
    overwrite: bool = setting(False, "Replace a data set already in --out_dir.")
    keep_parts: bool = setting(False, "Keep <out_dir>/.parts after the merge.")
    progress: bool = setting(
        False,
        f"Progress on stderr: a bar on a terminal, else a plain line every {EVERY_S:g} s "
        f"({SWITCH}=0 turns every binary's progress off).",
        flag_default=True,
    )
    qc: bool = setting(
        True,
        "Write qc/<slide>.png per slide: the thumbnail with kept tiles (green), dropped tiles "
        "(red) and annotation outlines; --noqc skips it.",
    )
    command: str = ""

    def __post_init__(self):
        require_finite(self)  # also the nested EncodeOptions (µm/px, tissue fraction)
        if not 0.0 < self.min_annotation_overlap <= 1.0:
            raise ConversionError(
                f"--min_annotation_overlap must be in (0, 1], got {self.min_annotation_overlap}"
            )

    def fingerprint(self) -> dict:
        """The fields that change the output (a resumed run must match them)."""
        d = dataclasses.asdict(self)
        for k in (
            "num_workers",
            "task_index",
            "overwrite",
            "keep_parts",
            "progress",
            "qc",
            "command",
        ):
            d.pop(k)
        return d

"""The conversion's frozen configuration (built by the binary from flags, or directly in tests)."""

from __future__ import annotations

import dataclasses

from kd_histo.convert.neardup import NearDupOptions
from kd_histo.convert.records import EncodeOptions
from kd_histo.numbers import require_finite


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Everything a conversion needs.

    Attributes:
      out_dir: folder for shards and dataset.json.
      input_dir: folder of class subfolders ("" = none).
      manifest: CSV manifest of tiles and/or slides ("" = none).
      slides: whole-slide image files or folders.
      slide_labels: CSV (path,label[,slide_id,patient_id,split]) of slides; "" = slides unlabeled.
      root: when set, manifest paths must lie inside it.
      h5_images: HDF5 file of image patches [N, H, W, 3] (PatchCamelyon style), read with
        tensorflow-io.
      h5_labels: HDF5 file of their labels ("" = unlabeled); label names are the integer values.
      h5_labels_key: dataset name of the labels (the images' is ``encode.h5_key``).
      class_names: fixed class order (default: sorted label names).
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
      progress: print a progress bar to stderr.
      command: the command line recorded in dataset.json.
    """

    out_dir: str
    input_dir: str = ""
    manifest: str = ""
    slides: tuple[str, ...] = ()
    slide_labels: str = ""
    root: str = ""
    h5_images: str = ""
    h5_labels: str = ""
    h5_labels_key: str = "y"
    class_names: tuple[str, ...] = ()
    group_by: str = "slide"
    phash_distance: int = 8
    groups: str = ""
    neardup: NearDupOptions = NearDupOptions()
    leakage_check: bool = True
    fractions: tuple[float, ...] = (0.7, 0.15, 0.15)
    seed: int = 0
    encode: EncodeOptions = EncodeOptions()
    slide_mpp: float = 0.0
    compression: str = ""
    examples_per_shard: int = 1000
    num_shards: int = 0
    num_workers: int = 0
    unit_size: int = 64
    task_index: int = 0
    num_tasks: int = 1
    overwrite: bool = False
    keep_parts: bool = False
    progress: bool = False
    command: str = ""

    def __post_init__(self):
        require_finite(self)  # also the nested EncodeOptions (µm/px, tissue fraction)

    def fingerprint(self) -> dict:
        """The fields that change the output (a resumed run must match them)."""
        d = dataclasses.asdict(self)
        for k in ("num_workers", "task_index", "overwrite", "keep_parts", "progress", "command"):
            d.pop(k)
        return d

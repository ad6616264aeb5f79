"""python tools/make_manifest.py --folders=NCT-CRC-HE-100K,CRC-VAL-HE-7K --splits=,test \\
    --out=nct.csv

Writes one CSV manifest (path,label,slide_id,patient_id,split) for several folders of class
subfolders, each with a fixed split or none ('' = kd-histo-convert chooses it by its
--split_fractions). The manifest then goes to ``kd-histo-convert --manifest=nct.csv``.
Thin shell over ``kd_histo.convert.manifest.write_manifest``.
"""

import sys

from absl import app, flags

flags.DEFINE_list("folders", [], "Folders of class subfolders.")
flags.DEFINE_list(
    "splits", [], "One split per folder: train, val, test, unlabeled or '' (convert chooses)."
)
flags.DEFINE_string("out", "", "The CSV manifest to write.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from kd_histo.convert.manifest import ManifestError, write_manifest

    splits = FLAGS.splits or [""] * len(FLAGS.folders)
    if not FLAGS.folders or not FLAGS.out or len(splits) != len(FLAGS.folders):
        print(
            "make_manifest: error: give --folders, --out and one --splits entry per folder",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        counts = write_manifest(list(zip(FLAGS.folders, splits)), FLAGS.out)
    except ManifestError as e:
        print(f"make_manifest: error: {e}", file=sys.stderr)
        sys.exit(2)
    for folder, n in counts.items():
        print(f"make_manifest: {n} tiles from {folder}")
    print(f"make_manifest: wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)

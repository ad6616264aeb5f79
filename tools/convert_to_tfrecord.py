"""python tools/convert_to_tfrecord.py --input_dir=<class folders> --out_dir=<data> --tile_px=224

Same as the ``kd-histo-convert`` console script (flags: ``--helpfull``); kept for checkouts that
are not pip-installed.
"""

from kd_histo.cli import convert

if __name__ == "__main__":
    convert.run()

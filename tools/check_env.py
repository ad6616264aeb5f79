"""python tools/check_env.py [--tf_build=cpu|gpu] -- the environment works, not just installs.

`make venv` runs it. Imports every package of the design card, decodes a TIFF inside TensorFlow with
tensorflow-io (the op that breaks on TensorFlow >= 2.17), runs one keras-cv op and opens OpenSlide's
library, then prints the versions. Checks that exactly one TensorFlow distribution is installed
(`tensorflow` and `tensorflow-cpu` write the same files) and, with --tf_build, that it is the build
asked for: `cpu` without CUDA, `gpu` with it. Exits non-zero with the failing package named.
"""

import argparse
import importlib.metadata
import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu")


def installed_tf_distributions() -> list[str]:
    """The TensorFlow distributions installed here, e.g. ``["tensorflow-cpu"]``."""
    found = []
    for name in TF_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf_build", choices=("cpu", "gpu"), help="the TensorFlow build expected")
    args = parser.parse_args(argv)
    dists = installed_tf_distributions()
    if len(dists) != 1:
        print(f"check_env: FAILED: expected one TensorFlow distribution, found {dists or 'none'}"
              " (reinstall with `make clean-venv venv`)", file=sys.stderr)  # fmt: skip
        return 1

    import numpy as np
    from PIL import Image

    checks = []
    try:
        import absl
        import keras
        import keras_cv
        import openslide
        import tensorboard
        import tensorflow as tf
        import tensorflow_io as tfio

        import kd_histo

        rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="TIFF")
        decoded = tfio.experimental.image.decode_tiff(tf.constant(buf.getvalue())).numpy()
        checks.append(("tensorflow-io decode_tiff", bool((decoded[..., :3] == rgb).all())))
        solarized = keras_cv.layers.Solarization(value_range=(0, 255))(tf.zeros([1, 2, 2, 3]))
        checks.append(("keras-cv Solarization", solarized.shape == (1, 2, 2, 3)))
        checks.append(("openslide library", bool(openslide.__library_version__)))
        checks.append(("keras.distillation", hasattr(keras, "distillation")))
        if args.tf_build:
            cuda = tf.test.is_built_with_cuda()
            checks.append(
                (f"{dists[0]} is the {args.tf_build} build", cuda == (args.tf_build == "gpu"))
            )
    except Exception as e:  # noqa: BLE001 -- the point is to name what failed, whatever it is
        print(f"check_env: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    failed = [name for name, ok in checks if not ok]
    if failed:
        print(f"check_env: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    versions = {
        "kd_histo": kd_histo.__version__,
        dists[0]: tf.__version__,
        "keras": keras.__version__,
        "keras-cv": keras_cv.__version__,
        "tensorflow-io": tfio.__version__,
        "numpy": np.__version__,
        "absl-py": absl.__version__,
        "tensorboard": tensorboard.__version__,
        "openslide": openslide.__library_version__,
    }
    print("kd_histo environment ready: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pipeline on real H&E pixels (../shared/data): a few LC25000 tiles written as shards here."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kd_histo import schema
from kd_histo.data import stain
from kd_histo.data.pipeline import PipelineConfig, make_dataset

from .data_helpers import block_mean

pytestmark = pytest.mark.realdata


def _real_shards(shared_data, out_dir, per_class=2):
    src = shared_data / "lc25000_lung"
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    os.makedirs(out_dir, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(out_dir, schema.shard_name("train", 0, 1))) as w:
        for k, c in enumerate(classes):
            for f in sorted(os.listdir(src / c))[:per_class]:
                img = tf.io.decode_jpeg(tf.io.read_file(str(src / c / f))).numpy()
                ex = schema.make_example(tf.io.encode_png(img).numpy(), 224, 224, label=k, source=f)
                w.write(ex.SerializeToString())
    schema.DatasetInfo(
        class_names=classes,
        tile_px=224,
        counts={"train": {c: per_class for c in classes}},
        shards={"train": 1},
    ).write(out_dir)
    return out_dir


def test_paired_views_on_real_tiles(shared_data, tmp_path):
    d = _real_shards(shared_data, str(tmp_path / "lc"))
    cfg = PipelineConfig(d, batch_size=6, factor=4, augment="paper+hed")
    b = {k: v.numpy() for k, v in next(iter(make_dataset(cfg))).items()}
    assert b["hr"].shape == (6, 224, 224, 3) and b["lr"].shape == (6, 56, 56, 3)
    np.testing.assert_allclose(b["lr"], block_mean(b["hr"], 4), atol=1e-5)
    assert set(b["label"].tolist()) <= {0, 1, 2}
    assert b["hr"].std() > 0.05  # real tissue texture, not a blank tile


def test_hed_deconvolution_of_real_tissue(shared_data):
    path = shared_data / "lc25000_lung" / "lung_aca"
    img = tf.io.decode_jpeg(tf.io.read_file(str(min(path.iterdir())))).numpy() / 255.0
    hed = stain.rgb_to_hed(img.astype(np.float32)).numpy()
    # Stained tissue: haematoxylin and eosin concentrations are mostly positive.
    assert (hed[..., 0] > 0).mean() > 0.9 and (hed[..., 1] > 0).mean() > 0.9
    back = stain.hed_to_rgb(hed).numpy()
    np.testing.assert_allclose(back, img, atol=1e-3)

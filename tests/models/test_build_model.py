"""kd_histo.models: the contract (input, normalisation, dict outputs), architectures, save/load."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kd_histo.models import ModelConfig, build_model, load_model

MEAN, STD = [0.6, 0.5, 0.7], [0.2, 0.25, 0.15]
TINY = dict(planes=(4, 8, 8, 16), stem="small")


def _x(n=2, px=16, seed=0):
    return np.random.default_rng(seed).random((n, px, px, 3), dtype=np.float32)


def test_outputs_any_size_and_dtypes():
    m = build_model("resnet_gn", 5, mean=MEAN, std=STD, **TINY)
    assert m.input_shape == (None, None, None, 3)
    for px, fmap in ((16, 2), (32, 4), (20, 3)):  # small stem: /8 with PyTorch's ceil for odd sizes
        out = m(_x(px=px))
        assert set(out) == {"logits", "features"}
        assert out["logits"].shape == (2, 5) and out["logits"].dtype == "float32"
        assert out["features"].shape == (2, fmap, fmap, 16)


def test_paper_backbone_shapes():
    m = build_model("resnet_gn", 3, mean=MEAN, std=STD)
    assert m(np.zeros((1, 224, 224, 3), "f4"))["features"].shape == (1, 7, 7, 256)
    assert m(np.zeros((1, 56, 56, 3), "f4"))["features"].shape == (1, 2, 2, 256)
    assert (
        len([layer for layer in m.layers if isinstance(layer, keras.layers.GroupNormalization)])
        == 1 + 4 * 2 + 3
    )


def test_blocks_and_batch_norm_configurable():
    m = build_model(
        "resnet_gn", 2, mean=MEAN, std=STD, planes=(4, 8), blocks=(2, 3), norm="batch", stem="small"
    )
    names = [layer.name for layer in m.layers]
    assert (
        "stage1_block2_out" in names
        and "stage2_block3_out" in names
        and "stage3_block1_out" not in names
    )
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in m.layers)
    with pytest.raises(ValueError, match="same length"):
        build_model("resnet_gn", 2, mean=MEAN, std=STD, planes=(4, 8), blocks=(1, 1, 1))


def test_first_layer_normalises_with_dataset_stats():
    m = build_model("resnet_gn", 2, mean=MEAN, std=STD, **TINY)
    norm = m.get_layer("normalize")
    x = _x()
    np.testing.assert_allclose(
        norm(x).numpy(), (x - np.array(MEAN)) / np.array(STD), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "arch,params", [("resnet18", 11_178_051), ("resnet34", 21_286_211), ("resnet50", 23_514_179)]
)
def test_standard_resnets_match_torchvision_parameter_counts(arch, params):
    # torchvision's counts with a 3-class head; layout errors would change them.
    m = build_model(arch, 3, mean=MEAN, std=STD, norm="batch")
    trainable = sum(
        int(np.prod(w.shape)) for w in m.trainable_weights
    )  # BN moving stats are not params
    assert trainable == params


def test_standard_resnet_tiny_forward_and_local_weights(tmp_path):
    m = build_model("resnet18", 3, mean=MEAN, std=STD, width_scale=1 / 16, groups=4)
    out = m(_x(px=32))
    assert out["features"].shape == (2, 1, 1, 32) and out["logits"].shape == (2, 3)
    path = str(tmp_path / "r18.weights.h5")
    m.save_weights(path)
    m2 = build_model("resnet18", 3, mean=MEAN, std=STD, width_scale=1 / 16, groups=4, weights=path)
    np.testing.assert_array_equal(m2(_x(px=32))["logits"].numpy(), out["logits"].numpy())
    with pytest.raises(FileNotFoundError, match="not found"):
        build_model("resnet18", 3, mean=MEAN, std=STD, weights=str(tmp_path / "absent.weights.h5"))


def test_bad_options_have_clear_errors():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vgg", 2, mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="unknown options"):
        build_model("resnet_gn", 2, mean=MEAN, std=STD, widht=3)
    with pytest.raises(ValueError, match="std > 0"):
        ModelConfig(std=(0.1, 0.0, 0.1))


def test_save_load_round_trip_safe_mode(tmp_path):
    m = build_model("resnet_gn", 4, mean=MEAN, std=STD, **TINY)
    path = str(tmp_path / "net.keras")
    m.save(path)
    m2 = load_model(path, expected_num_classes=4)
    x = _x(px=24)
    np.testing.assert_array_equal(m2(x)["logits"].numpy(), m(x)["logits"].numpy())
    np.testing.assert_array_equal(m2(x)["features"].numpy(), m(x)["features"].numpy())
    with pytest.raises(ValueError, match="has 4 classes but the data set has 3"):
        load_model(path, expected_num_classes=3)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "teacher.keras"))
    inputs = keras.Input((None, None, 1))
    feats = keras.layers.Conv2D(2, 3)(inputs)
    logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(feats))
    gray = keras.Model(inputs, {"logits": logits, "features": feats})
    path = str(tmp_path / "gray.keras")
    gray.save(path)
    with pytest.raises(ValueError, match="1-channel input"):
        load_model(path)

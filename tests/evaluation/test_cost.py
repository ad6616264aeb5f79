"""Cost: FLOPs from the TF graph against a hand count, ratios across resolutions, outputs."""

import json
import os

import keras
import numpy as np
import pytest

from kd_histo.evaluation import cost
from kd_histo.models import build_model


def _conv_net():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, {"logits": keras.layers.Dense(2)(x), "features": x})


def test_flops_of_one_conv_match_hand_count():
    net = _conv_net()
    flops = cost.count_flops(net, 8)
    conv = 2 * 8 * 8 * 4 * 3 * 3 * 3  # multiply-adds of a 3x3 conv, 3 -> 4 channels, 8x8 output
    dense = 2 * 4 * 2
    # the profiler also counts the mean of the pooling and the bias add: a few tens of FLOPs
    assert conv + dense <= flops <= conv + dense + 8 * 8 * 4 + 16


def test_flops_ratio_tracks_pixel_ratio():
    net = build_model("resnet_gn", 3, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    f = {px: cost.count_flops(net, px) for px in (128, 64, 32)}
    assert 3.5 < f[128] / f[64] < 4.2
    assert 13 < f[128] / f[32] < 17


def test_model_cost_table_and_files(tmp_path):
    net = build_model("resnet_gn", 3, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    entries = [
        cost.model_cost("teacher", net, 64, batch_sizes=(1, 2), repeats=2),
        cost.model_cost("student_x2", net, 32, batch_sizes=(2,), repeats=2),
    ]
    assert entries[0].params == cost.count_params(net) == entries[1].params
    assert all(t["latency_ms"] > 0 and t["images_per_s"] > 0 for e in entries for t in e.timings)
    rows = cost.cost_table(entries, reference="teacher")
    assert rows[0]["flops_ratio_to_ref"] == 1.0
    assert rows[1]["flops_ratio_to_ref"] == pytest.approx(entries[0].flops / entries[1].flops)
    paths = cost.write_cost(rows, str(tmp_path))
    loaded = json.load(open(paths["json"]))
    assert [r["name"] for r in loaded["rows"]] == ["teacher", "student_x2"]
    md = open(paths["markdown"]).read()
    assert md.count("\n") == 4 and "student_x2" in md


def test_profile_trace_is_written(tmp_path):
    net = build_model("resnet_gn", 2, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    log_dir = cost.profile_training_steps(net, 16, str(tmp_path / "trace"), steps=2, batch_size=2)
    traces = [f for _, _, fs in os.walk(log_dir) for f in fs if f.endswith(".xplane.pb")]
    assert traces, "no profiler trace written"


def test_cost_table_rejects_empty():
    with pytest.raises(ValueError, match="no networks"):
        cost.cost_table([])


def test_count_params_matches_keras():
    net = _conv_net()
    assert cost.count_params(net) == net.count_params() == 3 * 3 * 3 * 4 + 4 * 2 + 2
    assert np.isfinite(cost.count_flops(net, 4))

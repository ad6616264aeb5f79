"""The domain-shift plan and its test sets (issue 30): what each net trains on, shifted shards of
the same schema, the NCT probe tiles."""

import glob
import io

import numpy as np
import support
from PIL import Image

from kd_histo import schema
from kd_histo.data import shifts
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.protocol import domain_probes
from kd_histo.protocol.domain_shift import DomainShiftConfig, plan
from kd_histo.training.config import DistillConfig, RunConfig


def _cfg(data_dir, tmp_path, **kw):
    base = RunConfig(
        mode="teacher",
        model_dir=str(tmp_path / "x"),
        data=PipelineConfig(data_dir, augment="flips", unlabeled_dirs=("elsewhere/cmu",)),
        distill=DistillConfig(teacher_cache="auto"),
    )
    return DomainShiftConfig(out_dir=str(tmp_path / "runs"), base=base, seeds=(0, 1), **kw)


def test_plan_pairs_each_teacher_with_its_label_free_student(tmp_path):
    data = support.write_tiny_shards(tmp_path / "data", unlabeled=8)  # 4 x 3 train tiles
    specs = plan(_cfg(data, tmp_path, settings=("none", "macenko", "hed")))
    assert [(s.seed, s.setting, s.net) for s in specs][:2] == [
        (0, "none", "teacher"),
        (0, "none", "student_x8"),
    ]
    assert len(specs) == 2 * 3 * 2
    by = {(s.seed, s.setting, s.net): s.config for s in specs}
    t, st = by[(1, "macenko", "teacher")], by[(1, "macenko", "student_x8")]
    assert t.stain.method == "macenko" and t.seed == 1 and t.data.seed == 1
    assert st.stain.method == "none"  # the student takes its teacher's reference
    assert st.distill.teacher == t.model_dir and st.distill.ce_weight == 0
    assert st.data.factor == 8 and st.data.unlabeled_dirs == ()  # the CMU slide is a probe
    n_train = schema.DatasetInfo.read(data).num_examples("train")
    assert abs(st.data.unlabeled_ratio - 8 / (n_train + 8)) < 1e-9
    assert st.distill.teacher_cache.endswith("teacher_cache_macenko_x8")
    hed = by[(0, "hed", "student_x8")]
    assert hed.data.augment == "paper+hed" and hed.distill.teacher_cache == ""
    assert by[(0, "hed", "teacher")].data.augment == "paper+hed"


def _images(data_dir, split="test"):
    out = []
    for path in schema.shard_paths(data_dir, split):
        for rec in support.records(path):
            ex = schema.parse_example_numpy(rec)
            out.append(
                (np.asarray(Image.open(io.BytesIO(ex["image"]))), ex["label"], ex["slide_id"])
            )
    return out


def test_shifted_split_keeps_labels_and_shifts_every_tile(tmp_path):
    data = support.write_tiny_shards(tmp_path / "data", tile_px=32, unlabeled=0)
    spec = shifts.hed_strong()
    out = domain_probes.write_shifted_split(data, spec, log=lambda line: None)
    assert out == f"{data}_hed_strong"
    before, after = _images(data), _images(out)
    assert [(label, s) for _, label, s in after] == [(label, s) for _, label, s in before]
    for (a, _, _), (b, _, _) in zip(before, after):
        np.testing.assert_array_equal(b, shifts.apply(spec, a))
    info = schema.DatasetInfo.read(out)
    assert info.counts == {"test": schema.DatasetInfo.read(data).counts["test"]}
    assert "hed_strong" in info.notes[-1]


def test_nct_probe_is_four_crops_and_one_resized_tile_each(shared_data, tmp_path):
    out, n = domain_probes.write_nct_probe(str(shared_data / "nct_crc_he_samples"), str(tmp_path))
    assert n == 45
    crops = sorted(glob.glob(f"{out}/crop_0.5um/*.png"))
    assert len(crops) == 36 and len(glob.glob(f"{out}/resized_1um/*.png")) == 9
    with Image.open(crops[0]) as im:
        assert im.size == (112, 112)

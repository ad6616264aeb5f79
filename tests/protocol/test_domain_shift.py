"""The domain-shift plan and its test sets (issue 30): what each net trains on, shifted shards of
the same schema, the NCT probe tiles; which rows a rerun measures again."""

import dataclasses
import glob
import io
import json
import os

import numpy as np
import pytest
import support
from PIL import Image

from kd_histo import schema
from kd_histo.data import shifts
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.models import ood
from kd_histo.protocol import domain_probes, domain_report, domain_shift
from kd_histo.protocol.domain_report import ShiftRow
from kd_histo.protocol.domain_shift import DomainShiftConfig, plan, reported_settings
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
    settings = (
        "none",
        "macenko",
        "reinhard",
        "hed",
        "reinhard_hed",
        "reinhard_lab_hed",
        "reinhard_lab_hed_patient",
    )
    specs = plan(_cfg(data, tmp_path, settings=settings))
    assert [(s.seed, s.setting, s.net) for s in specs][:2] == [
        (0, "none", "teacher"),
        (0, "none", "student_x8"),
    ]
    assert len(specs) == 2 * len(settings) * 2
    by = {(s.seed, s.setting, s.net): s.config for s in specs}
    t, st = by[(1, "macenko", "teacher")], by[(1, "macenko", "student_x8")]
    assert t.stain.method == "macenko" and t.seed == 1 and t.data.seed == 1
    assert st.stain.method == "none"  # the student takes its teacher's reference
    assert st.distill.teacher == t.model_dir and st.distill.ce_weight == 0
    assert st.data.factor == 8 and st.data.unlabeled_dirs == ()  # the CMU slide is a probe
    n_train = schema.DatasetInfo.read(data).num_examples("train")
    assert abs(st.data.unlabeled_ratio - 8 / (n_train + 8)) < 1e-9
    assert st.distill.teacher_cache.endswith("teacher_cache_macenko_x8")
    t, st = by[(0, "reinhard", "teacher")], by[(0, "reinhard", "student_x8")]
    assert t.stain.method == "reinhard" and t.data.augment == "flips"
    assert st.stain.method == "none" and st.distill.teacher == t.model_dir
    assert st.distill.teacher_cache.endswith("teacher_cache_reinhard_x8")
    hed = by[(0, "hed", "student_x8")]
    assert hed.data.augment == "paper+hed" and hed.distill.teacher_cache == ""
    assert by[(0, "hed", "teacher")].data.augment == "paper+hed"
    t, st = by[(1, "reinhard_hed", "teacher")], by[(1, "reinhard_hed", "student_x8")]
    assert t.stain.method == "reinhard" and t.data.augment == "flips+hed_strong"
    assert st.data.augment == "flips+hed_strong" and st.distill.teacher_cache == ""
    assert st.stain.method == "none" and st.distill.teacher == t.model_dir
    t, st = by[(0, "reinhard_lab_hed", "teacher")], by[(0, "reinhard_lab_hed", "student_x8")]
    assert t.stain.method == "reinhard" and t.data.augment == "flips+lab+hed_strong"
    assert st.data.augment == "flips+lab+hed_strong" and st.distill.teacher_cache == ""
    # the patient student distils the same teacher (one folder, trained once) for 3x the epochs
    pt, pst = (
        by[(0, "reinhard_lab_hed_patient", "teacher")],
        by[(0, "reinhard_lab_hed_patient", "student_x8")],
    )
    assert pt == t and pst.distill.teacher == t.model_dir
    assert pst.epochs == 3 * st.epochs and pst.model_dir != st.model_dir
    assert dataclasses.replace(pst, epochs=st.epochs, model_dir=st.model_dir) == st


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


def _row(seed, setting, net, test_set, fmt=ood.FORMAT):
    return ShiftRow(seed, setting, net, test_set, 10, accuracy=0.5, ood_format=fmt)


def _fake_driver(monkeypatch, calls):
    """The runner with training, refitting and measuring replaced by records of the calls."""
    monkeypatch.setattr(domain_shift, "_train", lambda config, log: calls.append(("train",)))
    monkeypatch.setattr(domain_shift, "_current_ood", lambda spec, log: None)
    monkeypatch.setattr(domain_shift, "test_sets", lambda cfg, log: {"test": "x"})

    def measure(cfg, spec, todo, sets, command):
        gone = [t for t in todo if os.path.exists(os.path.join(spec.measure_dir, t))]
        calls.append((spec.net, tuple(todo), tuple(gone)))
        return [_row(spec.seed, spec.setting, spec.net, t) for t in todo]

    monkeypatch.setattr(domain_shift, "_measure", measure)


def test_rows_of_an_older_score_and_named_nets_are_measured_again(tmp_path, monkeypatch):
    data = support.write_tiny_shards(tmp_path / "data", unlabeled=8)
    cfg = _cfg(data, tmp_path, settings=("none",), results_dir=str(tmp_path / "res"))
    cfg = dataclasses.replace(cfg, seeds=(0,))
    specs = {s.net: s for s in plan(cfg)}
    sets = specs["student_x8"].test_sets()
    csv_path = str(tmp_path / "res" / domain_report.RESULTS_CSV)
    os.makedirs(os.path.dirname(csv_path))
    old = [_row(0, "none", "teacher", t, fmt=1) for t in specs["teacher"].test_sets()]
    domain_report.write_rows(csv_path, old + [_row(0, "none", "student_x8", t) for t in sets])
    for spec in specs.values():
        for t in spec.test_sets():
            os.makedirs(os.path.join(spec.measure_dir, t))
    calls = []
    _fake_driver(monkeypatch, calls)
    domain_shift.run(cfg, "cmd", "about", log=lambda line: None)
    measured = [c for c in calls if c[0] != "train"]
    assert measured == [("teacher", specs["teacher"].test_sets(), ())]  # folders dropped first
    rows = domain_report.read_rows(csv_path)
    assert len(rows) == len(old) + len(sets) and not any(
        r.stale(domain_shift.NORMALISED) for r in rows
    )
    assert "stale" not in open(os.path.join(os.path.dirname(csv_path), "results.md")).read()

    calls.clear()
    domain_shift.run(cfg, "cmd", "about", log=lambda line: None)
    assert calls == []  # nothing stale, nothing named: all skipped
    domain_shift.run(
        dataclasses.replace(cfg, redo=("none/student_x8",)), "cmd", "", log=lambda line: None
    )
    assert [c for c in calls if c[0] != "train"] == [("student_x8", sets, ())]


def test_results_md_keeps_the_settings_of_earlier_runs():
    rows = [ShiftRow(0, "hed", "teacher", "test", 9), ShiftRow(0, "none", "teacher", "test", 9)]
    assert reported_settings(("reinhard_hed",), rows) == ("none", "hed", "reinhard_hed")
    assert reported_settings(("macenko",), []) == ("macenko",)


def test_redo_names_settings_and_nets_of_the_run():
    base = RunConfig(mode="teacher", model_dir="x", data=PipelineConfig("d"))
    cfg = DomainShiftConfig(out_dir="o", base=base, settings=("none", "hed"), redo=("hed",))
    assert cfg.redone("hed", "teacher") and not cfg.redone("none", "teacher")
    cfg = dataclasses.replace(cfg, redo=("none/student_x8",))
    assert cfg.redone("none", "student_x8") and not cfg.redone("none", "teacher")
    for bad in ("macenko", "none/student_x4", "none/"):
        with pytest.raises(ValueError, match="redo"):
            dataclasses.replace(cfg, redo=(bad,))


def test_a_net_with_statistics_of_an_older_format_is_refitted(tmp_path, monkeypatch):
    from kd_histo.training import domain

    data = support.write_tiny_shards(tmp_path / "data", unlabeled=8)
    spec = plan(_cfg(data, tmp_path, settings=("none",)))[0]
    os.makedirs(os.path.join(spec.measure_dir, "test"))
    np.savez(os.path.join(spec.model_dir, ood.OOD_FILE), meta=json.dumps({"threshold": 1.0}))
    refits = []
    monkeypatch.setattr(domain, "refit_ood", lambda d, log: refits.append(d) or "stats")
    domain_shift._current_ood(spec, lambda line: None)
    assert refits == [spec.model_dir] and not os.path.exists(spec.measure_dir)
    stats = ood.OODStats((ood.OODTerm("features", "mean", np.zeros((2, 2)), np.eye(2)),), 1.0)
    stats.save(spec.model_dir)  # this kd_histo's format: left alone
    domain_shift._current_ood(spec, lambda line: None)
    assert refits == [spec.model_dir]


def test_the_flagfile_trains_every_setting_of_the_runner():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "flags", "lc25000", "domain_shift.flags")) as f:
        line = next(x for x in f if x.startswith("--settings="))
    settings = tuple(line.strip().split("=", 1)[1].split(","))
    assert settings == tuple(domain_shift.SETTINGS)  # reinhard too
    base = RunConfig(mode="teacher", model_dir="x", data=PipelineConfig("d"))
    assert DomainShiftConfig(out_dir="o", base=base, settings=settings).settings == settings


def test_the_none_teacher_can_be_the_main_experiments(tmp_path, monkeypatch):
    data = support.write_tiny_shards(tmp_path / "data", unlabeled=8)
    main = str(tmp_path / "main")
    cfg = _cfg(data, tmp_path, settings=("none", "macenko"), teachers_from=main)
    by = {(s.seed, s.setting, s.net): s for s in plan(cfg)}
    t = by[(1, "none", "teacher")]
    assert t.borrowed and t.model_dir == os.path.join(main, "runs", "s1", "teacher")
    assert t.measure_dir == os.path.join(cfg.out_dir, "s1", "teacher_none", "measure")
    assert by[(1, "none", "student_x8")].config.distill.teacher == t.model_dir
    assert not by[(1, "macenko", "teacher")].borrowed  # only the none setting's is the same
    assert not by[(1, "none", "student_x8")].borrowed

    with pytest.raises(ValueError, match="holds no trained teacher for seed 0"):
        domain_shift.check_borrowed(by[(0, "none", "teacher")])
    monkeypatch.setattr(domain_shift, "_trained", lambda model_dir: True)
    os.makedirs(t.model_dir)
    config_json = os.path.join(t.model_dir, "config.json")
    # the main experiment's teacher keeps its unlabeled dirs (it reads none): the same teacher
    main_teacher = dataclasses.replace(
        t.config, data=dataclasses.replace(t.config.data, unlabeled_dirs=("cmu",))
    )
    with open(config_json, "w") as f:
        json.dump(main_teacher.to_dict(), f)
    domain_shift.check_borrowed(t)
    with open(config_json, "w") as f:
        json.dump(dataclasses.replace(main_teacher, epochs=3).to_dict(), f)
    with pytest.raises(ValueError, match=r"other settings \(epochs\)"):
        domain_shift.check_borrowed(t)
    with open(config_json, "w") as f:
        json.dump(main_teacher.to_dict(), f)
    np.savez(os.path.join(t.model_dir, ood.OOD_FILE), meta=json.dumps({"threshold": 1.0}))
    with pytest.raises(ValueError, match="format 1 .* refit them there"):
        domain_shift.check_borrowed(t)


def test_a_borrowed_teacher_is_measured_not_trained(tmp_path, monkeypatch):
    data = support.write_tiny_shards(tmp_path / "data", unlabeled=8)
    cfg = _cfg(data, tmp_path, settings=("none",), teachers_from=str(tmp_path / "main"))
    cfg = dataclasses.replace(cfg, seeds=(0,), results_dir=str(tmp_path / "res"))
    calls, checked = [], []
    _fake_driver(monkeypatch, calls)
    monkeypatch.setattr(domain_shift, "check_borrowed", lambda spec: checked.append(spec.net))
    monkeypatch.setattr(domain_shift, "_train", lambda config, log: calls.append(config.model_dir))
    domain_shift.run(cfg, "cmd", "about", log=lambda line: None)
    teacher_dir = os.path.join(str(tmp_path / "main"), "runs", "s0", "teacher")
    student_dir = os.path.join(cfg.out_dir, "s0", "student_x8_none")
    assert checked == ["teacher"]
    assert [c for c in calls if isinstance(c, str)] == [student_dir]  # the teacher is not trained
    assert not os.path.exists(teacher_dir)  # nor written into
    assert [c[0] for c in calls if isinstance(c, tuple)] == ["teacher", "student_x8"]

"""Seed statistics and the paired bootstrap: NumPy references, a known difference, coverage; the
report's paired table, seed means and multi-seed figures."""

import dataclasses
import os

import numpy as np
import pytest

from kd_histo.protocol import figures, paired
from kd_histo.protocol.rows import mean_rows, paired_table
from kd_histo.protocol.tables import paired_markdown


def test_seed_stats_match_numpy():
    v = [0.91, 0.88, 0.9]
    s = paired.seed_stats(v)
    assert s.n == 3 and s.values == tuple(v)
    assert s.mean == pytest.approx(np.mean(v)) and s.sd == pytest.approx(np.std(v, ddof=1))
    assert paired.seed_stats([0.5]).sd == 0.0
    with pytest.raises(ValueError, match="at least one seed"):
        paired.seed_stats([])


def test_known_difference_is_the_mean_and_inside_the_interval():
    rng = np.random.default_rng(0)
    b = rng.random((3, 500)) < 0.7
    a = b.copy()
    a[:, :50] = True  # the student gets 50 more tiles right in every seed...
    b[:, :50] = False
    d = paired.paired_bootstrap(a, b, n_boot=500)
    ref = (a.astype(float) - b).mean()
    assert d.mean == pytest.approx(ref) and d.mean == pytest.approx(0.1)
    np.testing.assert_allclose(d.per_seed, (a.astype(float) - b).mean(1))
    assert d.low < 0.1 < d.high and d.low > 0.05 and (d.n_seeds, d.n_tiles) == (3, 500)
    same = paired.paired_bootstrap(b, b, n_boot=100)  # ...and none against itself
    assert same.mean == same.low == same.high == 0.0


def test_one_seed_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    a, b = rng.random(2000) < 0.8, rng.random(2000) < 0.7
    d = paired.paired_bootstrap(a, b, n_boot=2000, seed=3)
    diff = a.astype(float) - b
    se = diff.std() / np.sqrt(len(diff))
    assert d.mean == pytest.approx(diff.mean())
    assert (d.high - d.low) == pytest.approx(2 * 1.96 * se, rel=0.12)


def test_resampling_groups_widens_the_interval_of_clustered_tiles():
    rng = np.random.default_rng(2)
    base = (rng.random(300) < 0.8).astype(float) - (rng.random(300) < 0.7)
    d = np.repeat(base, 5)  # 5 identical copies per group: 300 independent values, not 1500
    groups = np.repeat(np.arange(300), 5)
    ones, zeros = (d > 0).astype(float), (d < 0).astype(float)
    tiles = paired.paired_bootstrap(ones, zeros, n_boot=1000)
    by_group = paired.paired_bootstrap(ones, zeros, groups, n_boot=1000)
    plain = paired.paired_bootstrap((base > 0) * 1.0, (base < 0) * 1.0, n_boot=1000)
    width = lambda x: x.high - x.low  # noqa: E731
    assert width(by_group) == pytest.approx(width(plain), rel=0.15)
    assert width(tiles) < 0.6 * width(by_group)


def test_interval_covers_the_true_difference_about_95_percent():
    rng = np.random.default_rng(4)
    covered = 0
    for k in range(60):
        # per-seed training noise and per-tile noise: true difference 0.05
        seed_shift = rng.normal(0, 0.02, (3, 1))
        b = rng.random((3, 300)) < 0.7
        a = rng.random((3, 300)) < 0.75 + seed_shift
        d = paired.paired_bootstrap(a, b, n_boot=300, seed=k)
        covered += d.low <= 0.05 <= d.high
    assert covered >= 51  # 95% nominal; >= 85% of 60 (a 3-seed bootstrap is a little narrow)


@dataclasses.dataclass
class _Spec:
    name: str
    kind: str
    factor: float
    unlabeled_fraction: float
    seed: int


def test_paired_table_pairs_seeds_and_tiles_of_student_and_baseline():
    specs = [
        _Spec(n, k, f, 0.0, s)
        for s in (0, 1, 2)
        for n, k, f in (
            ("teacher", "teacher", 1.0),
            ("baseline_x4", "baseline", 4.0),
            ("student_x4", "student", 4.0),
        )
    ]
    keys = [(f"t{i}.png", 0, 0) for i in range(100)]
    correct = {}
    for s, (acc_b, acc_s) in enumerate(((60, 70), (65, 70), (50, 70))):
        correct[f"s{s}/baseline_x4"] = {
            k: (int(i < acc_b), f"g{i // 4}") for i, k in enumerate(keys)
        }
        correct[f"s{s}/student_x4"] = {
            k: (int(i < acc_s), f"g{i // 4}") for i, k in enumerate(keys)
        }
    correct["s2/student_x4"].pop(keys[-1])  # a tile one run lacks is left out of every seed
    del correct["s1/baseline_x4"]  # a seed whose baseline has not run is left out
    (row,) = paired_table(specs, correct, n_boot=200)
    assert (row["student"], row["baseline"], row["seeds"], row["n_tiles"]) == (
        "student_x4",
        "baseline_x4",
        2,
        99,
    )
    assert row["per_seed"] == pytest.approx([10 / 99, 20 / 99])  # tile 99 dropped in both seeds
    assert row["difference"] == pytest.approx(15 / 99)
    assert row["low"] <= row["difference"] <= row["high"]
    assert "| x4 | student_x4 | baseline_x4 | 2 | 99 | +15.2 [" in paired_markdown([row])


def test_mean_rows_and_multi_seed_figures(tmp_path):
    rows = []
    for seed, accs in enumerate(((0.9, 0.8, 0.82, 0.85), (0.92, 0.78, 0.84, 0.86))):
        for (name, kind, f, u), acc in zip(
            (
                ("teacher", "teacher", 1.0, 0.0),
                ("baseline_x2", "baseline", 2.0, 0.0),
                ("student_x2", "student", 2.0, 0.0),
                ("student_x2_unl100", "student", 2.0, 1.0),
            ),
            accs,
        ):
            rows.append(
                {
                    "seed": seed,
                    "run": name,
                    "kind": kind,
                    "factor": f,
                    "unlabeled_fraction": u,
                    "accuracy": acc,
                    "gap_to_teacher": None,
                    "gflops": 1.0 if f == 1 else 0.25,
                }
            )
    means = {r["run"]: r for r in mean_rows(rows)}
    assert means["student_x2"]["accuracy"] == pytest.approx(0.83)
    sd = np.std([0.82, 0.84], ddof=1)
    assert (
        means["student_x2"]["accuracy_low"] == pytest.approx(0.83 - sd)
        and means["student_x2"]["seeds"] == 2
    )
    for fn in (figures.accuracy_vs_gflops_png, figures.accuracy_vs_unlabeled_png):
        path = fn(list(means.values()), str(tmp_path / f"{fn.__name__}.png"), seed_rows=rows)
        assert os.path.getsize(path) > 0

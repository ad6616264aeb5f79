"""Splits: never a slide or patient in two splits, stratified, seeded; pHash grouping."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_histo.convert import phash, splits
from kd_histo.convert.errors import ConversionError


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 8), st.integers(-1, 2)),
        min_size=1,
        max_size=80,
    ),
    st.integers(0, 5),
)
def test_no_slide_or_patient_is_in_two_splits(rows, seed):
    slide_ids = [f"s{s}" for s, _, _ in rows]
    patient_ids = [f"p{p}" if p else "" for _, p, _ in rows]
    labels = [lab for _, _, lab in rows]
    out = splits.assign_splits(slide_ids, patient_ids, labels, seed=seed)
    for ids in (slide_ids, patient_ids):
        seen = collections.defaultdict(set)
        for i, s in zip(ids, out):
            if i and s:
                seen[i].add(s)
        for v in seen.values():
            # One evaluation split at most; "unlabeled" may share a slide only with "train" (both
            # are training data, so nothing seen in training is ever evaluated on).
            assert len(v - {"unlabeled"}) <= 1
            assert "unlabeled" not in v or v <= {"train", "unlabeled"}
    for lab, s in zip(labels, out):
        assert (s in ("train", "val", "test")) if lab >= 0 else (s in ("unlabeled", ""))


def test_stratified_shares_and_seed_reproducibility():
    slide_ids = [f"{c}-{i}" for c in range(3) for i in range(200)]
    labels = [c for c in range(3) for _ in range(200)]
    a = splits.assign_splits(slide_ids, [""] * 600, labels, (0.7, 0.15, 0.15), seed=1)
    assert a == splits.assign_splits(slide_ids, [""] * 600, labels, (0.7, 0.15, 0.15), seed=1)
    assert a != splits.assign_splits(slide_ids, [""] * 600, labels, (0.7, 0.15, 0.15), seed=2)
    for c in range(3):
        got = collections.Counter(s for s, lab in zip(a, labels) if lab == c)
        assert (
            abs(got["train"] - 140) <= 1
            and abs(got["val"] - 30) <= 1
            and abs(got["test"] - 30) <= 1
        )


def test_small_sets_get_every_class_in_every_split():
    slide_ids = [f"{c}-{i % 3}" for c in range(2) for i in range(6)]
    labels = [c for c in range(2) for _ in range(6)]
    out = splits.assign_splits(slide_ids, [""] * 12, labels)
    for c in range(2):
        assert {s for s, lab in zip(out, labels) if lab == c} == {"train", "val", "test"}


def test_fourth_share_holds_whole_labeled_groups_out():
    slide_ids = [f"s{i // 5}" for i in range(400)]  # 80 slides of 5 tiles, 2 classes
    labels = [(i // 5) % 2 for i in range(400)]
    out = splits.assign_splits(
        slide_ids, [""] * 400, labels, fractions=(0.4, 0.1, 0.1, 0.4), seed=1
    )
    shares = collections.Counter(out)
    assert set(shares) == {"train", "val", "test", "unlabeled"}
    assert abs(shares["unlabeled"] / 400 - 0.4) < 0.05 and abs(shares["train"] / 400 - 0.4) < 0.05
    by_slide = collections.defaultdict(set)
    for sid, s in zip(slide_ids, out):
        by_slide[sid].add(s)
    assert all(len(v) == 1 for v in by_slide.values())
    with pytest.raises(ConversionError, match="3 \\(train,val,test\\) or 4"):
        splits.assign_splits(["a"], [""], [0], fractions=(1, 0))


def test_manifest_splits_are_kept_and_leaks_refused():
    out = splits.assign_splits(["a", "b"], ["", ""], [0, 1], given=["test", ""])
    assert out[0] == "test"
    with pytest.raises(ConversionError, match="one split"):
        splits.assign_splits(["a", "a"], ["", ""], [0, 0], given=["train", "test"])


def test_unlabeled_on_an_evaluation_slide_is_left_out():
    out = splits.assign_splits(["a", "a"], ["", ""], [0, -1], fractions=(0, 0, 1))
    assert out == ["test", ""]
    out = splits.assign_splits(["a", "a", "b"], ["", "", ""], [0, -1, -1], fractions=(1, 0, 0))
    assert out == ["train", "unlabeled", "unlabeled"]


def test_phash_groups_flips_rotations_and_recompressions_not_different_images():
    rng = np.random.default_rng(0)
    base = (
        (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    )  # blocky = hashable
    other = (rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
    noisy = np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    images = [base, np.rot90(base), base[::-1], noisy, other, np.rot90(other, 3)]
    hashes = np.stack([phash.phash_variants(np.ascontiguousarray(im)) for im in images])
    groups = phash.group_by_hash(hashes, max_distance=8)
    assert groups.tolist() == [0, 0, 0, 0, 1, 1]


def test_hamming_matches_python_popcount():
    a = np.array([0, 2**64 - 1, 0b1011], np.uint64)
    b = np.array([1, 0, 0b0110], np.uint64)
    assert phash.hamming(a, b).tolist() == [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b)]

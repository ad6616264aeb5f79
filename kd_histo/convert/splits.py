"""Assigns inputs to train/val/test: slide- and patient-disjoint, class-stratified, seeded.

Inputs are grouped into connected components of shared slide ids *and* shared patient ids, so no
slide and no patient ever lands in two splits. Labeled groups are stratified by their majority
class: within each class, groups are shuffled with the seed and each goes to the split furthest
below its target share of that class's tiles (after each split got one group, when there are
enough). An optional fourth share sends labeled groups to ``unlabeled`` (their labels are then
dropped by the caller): a label-scarce setting made from a fully labeled set, group-disjoint from
val and test like everything else. Unlabeled inputs go to ``unlabeled``; the one
exception to "one split per slide" is that ``unlabeled`` may share slides with ``train`` (both feed
training only), while unlabeled tiles of val/test slides are left out. A manifest's
split column, when given, wins, and is checked for slides or patients that cross splits.

This module only sees ids, labels and counts; it reads no files.
"""

from __future__ import annotations

import collections

import numpy as np

from kd_histo.convert.errors import ConversionError


def connected_groups(slide_ids: list[str], patient_ids: list[str]) -> list[int]:
    """Group index per item: items sharing a slide id or a (non-empty) patient id share a group."""
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for s, p in zip(slide_ids, patient_ids):
        a = find("s:" + s)
        if p:
            b = find("p:" + p)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots, out = {}, []
    for s in slide_ids:
        out.append(roots.setdefault(find("s:" + s), len(roots)))
    return out


def assign_splits(
    slide_ids: list[str],
    patient_ids: list[str],
    labels: list[int],
    fractions: tuple[float, ...] = (0.7, 0.15, 0.15),
    seed: int = 0,
    given: list[str] | None = None,
    weights: list[int] | None = None,
) -> list[str]:
    """Chooses a split per item.

    Args:
      slide_ids: slide of each item.
      patient_ids: patient of each item ("" = unknown; then only the slide groups it).
      labels: class index of each item, -1 for unlabeled.
      fractions: target shares of train, val, test and optionally unlabeled (labeled groups
        stored without labels), normalised; zero shares are allowed.
      seed: the same seed and inputs give the same splits.
      given: per-item split from a manifest ("" = choose); non-empty values are kept.
      weights: tiles per item (slides count their tiles); default 1 each.

    Returns:
      The split name of each item; "" for an unlabeled item whose slide/patient group went to val
      or test (using it for label-free training would leak an evaluation slide).

    Raises:
      ConversionError: bad fractions, or given splits that put one slide/patient in two splits.
    """
    fr = _normalised_fractions(fractions)
    n = len(slide_ids)
    weights = weights or [1] * n
    given = given or [""] * n
    groups = connected_groups(slide_ids, patient_ids)
    members: dict[int, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out, free = _place_fixed_groups(members, slide_ids, labels, given)
    _distribute_free_groups(free, members, labels, weights, fr, seed, out)
    return out


def _normalised_fractions(fractions: tuple[float, ...]) -> np.ndarray:
    """The split shares summing to 1, after checking there are 3 or 4 of them, none negative."""
    fr = np.asarray(fractions, np.float64)
    if fr.shape not in ((3,), (4,)) or (fr < 0).any() or fr.sum() <= 0:
        raise ConversionError(
            "split fractions must be 3 (train,val,test) or 4 (...,unlabeled) non-negative numbers "
            f"with a positive sum, got {fractions}"
        )
    return fr / fr.sum()


def _place_fixed_groups(
    members: dict[int, list[int]], slide_ids: list[str], labels: list[int], given: list[str]
) -> tuple[list[str], dict[int, list[int]]]:
    """Splits of the groups already decided: the manifest's split, or ``unlabeled`` for groups
    without labels. Returns those splits per item ("" = not yet chosen) and the groups left to
    choose, by majority class (ties go to the lower class index).

    Raises:
      ConversionError: the manifest gives one group two splits.
    """
    out = [""] * len(slide_ids)
    free: dict[int, list[int]] = collections.defaultdict(list)  # majority class -> groups
    for g, idx in members.items():
        fixed = {given[i] for i in idx if given[i]}
        if len(fixed) > 1:
            names = sorted({slide_ids[i] for i in idx})[:3]
            raise ConversionError(
                f"the manifest's split column puts slide/patient group {names} "
                f"in splits {sorted(fixed)}; "
                "give all tiles of a slide and of a patient one split"
            )
        if fixed:
            split = fixed.pop()
            for i in idx:
                out[i] = split
            continue
        if all(labels[i] < 0 for i in idx):
            for i in idx:
                out[i] = "unlabeled"
            continue
        votes = collections.Counter(labels[i] for i in idx if labels[i] >= 0)
        free[min(votes, key=lambda c: (-votes[c], c))].append(g)
    return out, free


def _distribute_free_groups(
    free: dict[int, list[int]],
    members: dict[int, list[int]],
    labels: list[int],
    weights: list[int],
    fr: np.ndarray,
    seed: int,
    out: list[str],
) -> None:
    """Sends each free group to a split, class by class in a seeded order, writing ``out``."""
    names = ("train", "val", "test", "unlabeled")[: len(fr)]
    rng = np.random.default_rng(seed)
    for cls in sorted(free):
        gs = sorted(free[cls])
        rng_order = rng.permutation(len(gs))
        filled = np.zeros(len(fr))
        total = sum(weights[i] for g in gs for i in members[g])
        for k in rng_order:
            g = gs[k]
            w = sum(weights[i] for i in members[g])
            # Every split with a positive share first gets one group of the class (so small sets
            # still have each class in each split); then the split furthest below its target.
            empty = [j for j in range(len(fr)) if fr[j] > 0 and filled[j] == 0]
            if empty and len(gs) >= int((fr > 0).sum()):
                s = empty[0]
            else:
                deficit = fr * total - filled
                deficit[fr == 0] = -np.inf
                s = int(np.argmax(deficit))
            filled[s] += w
            for i in members[g]:
                if labels[i] >= 0 or names[s] == "unlabeled":
                    out[i] = names[s]
                elif names[s] == "train":
                    out[i] = "unlabeled"  # both are training data: no evaluation slide leaks
                # else: "" -- an unlabeled tile on a val/test slide; the caller leaves it out

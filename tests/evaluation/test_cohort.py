"""kd_histo.evaluation.cohort's pure parts: the tasks' shares of a cohort, balanced by size."""

import itertools

import pytest

from kd_histo.evaluation import cohort


def _loads(task, sizes, n):
    return [sum(s for s, t in zip(sizes, task) if t == k) for k in range(n)]


def _best_max_load(sizes, n):
    """The optimum by brute force (small cases)."""
    return min(max(_loads(a, sizes, n)) for a in itertools.product(range(n), repeat=len(sizes)))


@pytest.mark.parametrize("seed", range(6))
def test_shares_are_balanced_by_size_within_the_greedy_bound(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = [int(v) for v in rng.integers(1, 10**6, size=int(rng.integers(1, 9)))]
    n = int(rng.integers(1, 4))
    task = cohort.balanced_shares(sizes, n)
    assert len(task) == len(sizes) and set(task) <= set(range(n))
    assert task == cohort.balanced_shares(list(sizes), n)  # a pure function
    # largest first, to the least loaded: at most 4/3 of the best split (Graham 1969)
    assert max(_loads(task, sizes, n)) <= 4 / 3 * _best_max_load(sizes, n)


def test_shares_follow_size_not_count():
    # one big slide and four small ones over two tasks: the big one is a task's whole share
    task = cohort.balanced_shares([10, 1000, 10, 10, 10], 2)
    assert task == [1, 0, 1, 1, 1]
    # equal sizes: round robin in input order
    assert cohort.balanced_shares([5] * 5, 3) == [0, 1, 2, 0, 1]
    assert cohort.balanced_shares([], 3) == []

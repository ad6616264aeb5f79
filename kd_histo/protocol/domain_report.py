"""The domain-shift measurements' table: one row per seed, setting, net and test set (issue 30).

``results.csv`` is the record: the runner (:mod:`kd_histo.protocol.domain_shift`) reads it to skip
what is measured already (a fresh checkout with the committed CSV skips finished seeds), appends
rows as they come, and rewrites ``results.md`` (mean ± sd over the seeds measured so far, with the
issue's targets) after each net. Each row says which out-of-domain score it was measured with
(``ood_format``, :data:`kd_histo.models.ood.FORMAT`); the runner redoes rows of an older one (for
the net's kind: :func:`kd_histo.models.ood.current_format`), and results.md says how many are
stale until then.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os

import numpy as np

from kd_histo.atomic import write_text
from kd_histo.models.ood import FORMAT as OOD_FORMAT
from kd_histo.models.ood import current_format

RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
# Test sets with labels (accuracy and flagged share) and unlabeled probes (flagged share only).
LABELED_SETS = ("test", "test_nct", "test_hed_strong")
PROBES = ("nct_tiles", "cmu_slide")
OOD_COST = "ood_cost"  # the student's inference time with vs without the score
TARGET_DROP_PTS = 2.0  # the x8 student's accuracy loss on shifted tiles, best setting
TARGET_IN_DOMAIN = 0.07  # flagged share of LC25000 test tiles, at most
TARGET_OUT_OF_DOMAIN = 0.90  # flagged share of NCT / CMU tiles, at least
TARGET_COST_PCT = 5.0  # extra inference time of the student's score, at most


@dataclasses.dataclass(frozen=True)
class ShiftRow:
    """One measurement: a net of one seed and setting on one test set (NaN = not measured).

    Attributes:
      seed: the run's seed.
      setting: a name of the runner's :data:`SETTINGS` ("none", "macenko", "reinhard", "hed",
        "reinhard_hed", "reinhard_lab", "reinhard_lab_hed", "reinhard_lab_hed_patient").
      net: "teacher" or "student_x<factor>".
      test_set: one of :data:`LABELED_SETS`, :data:`PROBES` or :data:`OOD_COST`.
      n: tiles measured.
      accuracy: tile accuracy (labeled sets).
      ood_flagged: share of the tiles above the run's out-of-domain threshold.
      ood_threshold: that threshold (the run's ``ood.npz``).
      ood_format: the format of the run's ``ood.npz`` the row was measured with (1: the pooled
        last map alone, before issue 30's multi-depth score); a row of a format older than the
        current one for its net is stale (:meth:`stale`). A results.csv written before this
        column reads as format 1.
      seconds_plain: ood_cost: median CPU seconds of one pass over the tiles without the score.
      seconds_ood: ood_cost: the same with the score.
      command: what reproduces the row.
    """

    seed: int
    setting: str
    net: str
    test_set: str
    n: int
    accuracy: float = math.nan
    ood_flagged: float = math.nan
    ood_threshold: float = math.nan
    ood_format: int = OOD_FORMAT
    seconds_plain: float = math.nan
    seconds_ood: float = math.nan
    command: str = ""

    @property
    def key(self) -> tuple[int, str, str, str]:
        return (self.seed, self.setting, self.net, self.test_set)

    def stale(self, normalised: frozenset[str]) -> bool:
        """Measured with an older out-of-domain score than this kd_histo's: to be redone.
        ``normalised``: the settings whose nets normalise stain (they got a term in format 3)."""
        return self.ood_format < current_format(self.setting in normalised)

    @property
    def extra_time_pct(self) -> float:
        return 100.0 * (self.seconds_ood / self.seconds_plain - 1.0)


FIELDS = [f.name for f in dataclasses.fields(ShiftRow)]
# Columns a results.csv of before may lack, and the value its rows had.
LEGACY = {"ood_format": "1"}


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def read_rows(path: str) -> list[ShiftRow]:
    """The rows of a results.csv ([] when there is none)."""
    if not os.path.isfile(path):
        return []
    types = {f.name: f.type for f in dataclasses.fields(ShiftRow)}
    rows = []
    with open(path, newline="") as f:
        for i, d in enumerate(csv.DictReader(f), 2):
            d = {**{k: v for k, v in LEGACY.items() if k not in d}, **d}
            if set(d) != set(FIELDS):
                raise ValueError(f"{path}: columns {sorted(d)} are not {FIELDS}; move it away")
            try:
                kw = {
                    k: (int(v) if types[k] == "int" else float(v or "nan"))
                    if types[k] in ("int", "float")
                    else v
                    for k, v in d.items()
                }
            except ValueError as e:
                raise ValueError(f"{path}, line {i}: {e}") from None
            rows.append(ShiftRow(**kw))
    return rows


def write_rows(path: str, rows: list[ShiftRow]) -> None:
    """All rows, sorted by seed, setting, net and test set order (atomic)."""
    order = {s: i for i, s in enumerate((*LABELED_SETS, *PROBES, OOD_COST))}
    rows = sorted(rows, key=lambda r: (r.seed, r.setting, r.net, order.get(r.test_set, 99)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([_cell(getattr(r, k)) for k in FIELDS])
    write_text(path, buf.getvalue())


def _mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{scale * v[0]:.{digits}f}"
    return f"{scale * np.mean(v):.{digits}f} ± {scale * np.std(v, ddof=1):.{digits}f}"


def summary_table(rows: list[ShiftRow], settings: tuple[str, ...]) -> str:
    """results.md's table: per setting and net, mean ± sd over seeds of the accuracies (%), the
    drops on the shifted sets (points) and the flagged shares (%)."""
    by = {r.key: r for r in rows}
    seeds = sorted({r.seed for r in rows})
    nets = sorted({r.net for r in rows}, key=lambda n: (n != "teacher", n))
    head = (
        "| setting | net | seeds | acc test | acc test-nct (drop) | acc test-hed_strong (drop) "
        "| flagged test | flagged test-nct | flagged test-hed | flagged NCT tiles "
        "| flagged CMU slide | score cost |"
    )
    lines = [head, "|" + "---|" * 12]
    for setting in settings:
        for net in nets:

            def col(test_set, field, setting=setting, net=net):
                return [
                    getattr(by[k], field) if (k := (s, setting, net, test_set)) in by else math.nan
                    for s in seeds
                ]

            base = col("test", "accuracy")
            if all(math.isnan(x) for x in base):
                continue
            n_seeds = sum(not math.isnan(x) for x in base)
            shifted = []
            for t in ("test_nct", "test_hed_strong"):
                acc = col(t, "accuracy")
                drop = [b - a for a, b in zip(acc, base)]
                shifted.append(f"{_mean_sd(acc)} ({_mean_sd(drop)})")
            cost = [
                by[k].extra_time_pct if (k := (s, setting, net, OOD_COST)) in by else math.nan
                for s in seeds
            ]
            flagged = [
                _mean_sd(col(t, "ood_flagged"))
                for t in ("test", "test_nct", "test_hed_strong", *PROBES)
            ]
            cost_text = _mean_sd(cost, 1.0) + " %" if net != "teacher" else "–"
            lines.append(
                f"| {setting} | {net} | {n_seeds} | {_mean_sd(base)} | {' | '.join(shifted)} "
                f"| {' | '.join(flagged)} | {cost_text} |"
            )
    return "\n".join(lines) + "\n"


def targets(
    rows: list[ShiftRow],
    settings: tuple[str, ...],
    student: str,
    normalised: frozenset[str] = frozenset(),
) -> list[str]:
    """One line per target of issue 30: the measured value (mean over seeds) and met / missed; a
    net's flag line says when its rows are stale (:meth:`ShiftRow.stale`)."""
    by: dict[tuple[str, str, str], list[ShiftRow]] = {}
    for r in rows:
        by.setdefault((r.setting, r.net, r.test_set), []).append(r)

    def mean(setting, net, test_set, field):
        v = [getattr(r, field) for r in by.get((setting, net, test_set), [])]
        v = [x for x in v if not math.isnan(x)]
        return float(np.mean(v)) if v else math.nan

    out = []
    drops = {
        s: max(
            mean(s, student, "test", "accuracy") - mean(s, student, t, "accuracy")
            for t in ("test_nct", "test_hed_strong")
        )
        for s in settings
    }
    drops = {s: d for s, d in drops.items() if not math.isnan(d)}
    if drops:
        best = min(drops, key=drops.get)
        ok = "met" if round(100 * drops[best], 1) <= TARGET_DROP_PTS else "missed"
        out.append(
            f"- {student} loses at most {TARGET_DROP_PTS:g} pts on the shifted tiles with the best "
            f"setting: best is `{best}`, worst-case drop {100 * drops[best]:.1f} pts: **{ok}**."
        )
    for s in settings:
        for net in ("teacher", student):
            vals = {t: mean(s, net, t, "ood_flagged") for t in ("test", *PROBES)}
            if math.isnan(vals["test"]):
                continue
            ok_in = "met" if round(vals["test"], 3) <= TARGET_IN_DOMAIN else "missed"
            far = [vals[t] for t in PROBES if not math.isnan(vals[t])]
            ok_out = "met" if far and round(min(far), 3) >= TARGET_OUT_OF_DOMAIN else "missed"
            stale = any(
                r.stale(normalised) for t in ("test", *PROBES) for r in by.get((s, net, t), [])
            )
            out.append(
                f"- `{s}` {net}: flagged {100 * vals['test']:.1f}% of LC25000 test tiles "
                f"(≤ {100 * TARGET_IN_DOMAIN:.0f}%: **{ok_in}**), NCT tiles "
                f"{100 * vals['nct_tiles']:.1f}%, CMU slide {100 * vals['cmu_slide']:.1f}% "
                f"(≥ {100 * TARGET_OUT_OF_DOMAIN:.0f}%: **{ok_out}**)"
                + (": stale, measured with an older score." if stale else ".")
            )
    costs = [r.extra_time_pct for r in rows if r.test_set == OOD_COST]
    if costs:
        ok = "met" if round(float(np.mean(costs)), 1) <= TARGET_COST_PCT else "missed"
        out.append(
            f"- the student's out-of-domain score costs {np.mean(costs):+.1f}% inference time "
            f"(mean of {len(costs)} nets; ≤ {TARGET_COST_PCT:g}%: **{ok}**)."
        )
    return out


def write_markdown(
    path: str,
    rows: list[ShiftRow],
    settings: tuple[str, ...],
    about: str,
    normalised: frozenset[str] = frozenset(),
) -> None:
    """results.md: what was measured (``about``), the table and the targets; ``normalised``: the
    settings whose nets normalise stain (:meth:`ShiftRow.stale`)."""
    student = next((r.net for r in rows if r.net != "teacher"), "student")
    stale = [r for r in rows if r.stale(normalised)]
    if stale:
        seeds = ", ".join(str(s) for s in sorted({r.seed for r in stale}))
        about += (
            f"\n\n**{len(stale)} of the {len(rows)} rows (seeds {seeds}) are stale**: measured "
            "with an older out-of-domain score (ood_format in results.csv older than "
            f"{OOD_FORMAT} for stain-normalised nets); their "
            "flagged shares and score cost are not those of this kd_histo's score. The command "
            "above redoes them (accuracies too)."
        )
    text = (
        "# LC25000 lung nets on shifted stains and on tissue from other sites (issue 30)\n\n"
        f"{about}\n\n{summary_table(rows, settings)}\n## Targets\n\n"
        + "\n".join(targets(rows, settings, student, normalised))
        + "\n"
    )
    write_text(path, text)

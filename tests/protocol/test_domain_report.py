"""The domain-shift table: CSV round trip (what a rerun skips), mean ± sd and the targets."""

import dataclasses
import math

from kd_histo.protocol import domain_report as dr
from kd_histo.protocol.domain_report import ShiftRow


def _rows():
    rows = []
    for seed, (acc, nct, flag_cmu) in enumerate([(0.90, 0.89, 0.95), (0.92, 0.89, 0.85)]):
        for net in ("teacher", "student_x8"):
            rows += [
                ShiftRow(seed, "none", net, "test", 899, accuracy=acc, ood_flagged=0.05),
                ShiftRow(seed, "none", net, "test_nct", 899, accuracy=nct, ood_flagged=0.5),
                ShiftRow(seed, "none", net, "test_hed_strong", 899, accuracy=acc - 0.01),
                ShiftRow(seed, "none", net, "nct_tiles", 45, ood_flagged=1.0),
                ShiftRow(seed, "none", net, "cmu_slide", 300, ood_flagged=flag_cmu),
            ]
        rows.append(
            ShiftRow(seed, "none", "student_x8", "ood_cost", 899, seconds_plain=1.0,
                     seconds_ood=1.02, command="python tools/domain_shift.py --seeds=0")
        )  # fmt: skip
    return rows


def test_csv_round_trip_keeps_every_row_and_nan(tmp_path):
    path = str(tmp_path / "results.csv")
    rows = _rows()
    dr.write_rows(path, list(reversed(rows)))
    back = dr.read_rows(path)
    assert {r.key for r in back} == {r.key for r in rows}
    got = {r.key: r for r in back}
    for r in rows:
        b = got[r.key]
        assert b.n == r.n and b.command == r.command
        for f in ("accuracy", "ood_flagged", "seconds_plain"):
            x, y = getattr(r, f), getattr(b, f)
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-9
    assert back[0].key == (0, "none", "student_x8", "test")  # sorted: seed, setting, net, set


def test_read_rows_of_a_missing_file_is_empty(tmp_path):
    assert dr.read_rows(str(tmp_path / "none.csv")) == []


def test_summary_gives_mean_sd_and_drops():
    table = dr.summary_table(_rows(), ("none",))
    teacher = next(line for line in table.splitlines() if "| teacher |" in line)
    # test: 90 and 92 -> 91.0 ± 1.4; test_nct drop: 1 and 3 pts -> 2.0 ± 1.4
    assert "| 91.0 ± 1.4 |" in teacher
    assert "89.0 ± 0.0 (2.0 ± 1.4)" in teacher
    student = next(line for line in table.splitlines() if "| student_x8 |" in line)
    assert "2.0 ± 0.0 %" in student  # 1.02 s against 1.00 s: +2%


def test_targets_say_met_and_missed():
    lines = dr.targets(_rows(), ("none",), "student_x8")
    assert any("worst-case drop 2.0 pts: **met**" in line for line in lines)
    # CMU flagged 95% and 85%: mean 90% -> met; test flagged 5% -> met
    assert any("`none` teacher" in line and "**met**" in line for line in lines)
    assert any("+2.0%" in line and "**met**" in line for line in lines)
    worse = [
        ShiftRow(r.seed, r.setting, r.net, r.test_set, r.n, r.accuracy, 0.2, r.ood_threshold,
                 r.seconds_plain, r.seconds_ood)
        if r.test_set == "cmu_slide" else r
        for r in _rows()
    ]  # fmt: skip
    assert any("CMU slide 20.0%" in line and "**missed**" in line for line in dr.targets(
        worse, ("none",), "student_x8"))  # fmt: skip


def test_a_csv_without_the_format_column_reads_as_the_old_score_and_says_so(tmp_path):
    path = str(tmp_path / "results.csv")
    dr.write_rows(path, _rows())
    lines = open(path).read().splitlines()
    col = lines[0].split(",").index("ood_format")
    legacy = "\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != col)
                       for line in lines)  # fmt: skip
    with open(path, "w") as f:
        f.write(legacy + "\n")
    back = dr.read_rows(path)
    assert {r.ood_format for r in back} == {1} and all(r.stale(frozenset()) for r in back)
    md = str(tmp_path / "results.md")
    dr.write_markdown(md, back, ("none",), "about")
    assert f"**{len(back)} of the {len(back)} rows (seeds 0, 1) are stale**" in open(md).read()
    dr.write_markdown(md, _rows(), ("none",), "about")  # this kd_histo's format: nothing stale
    assert "stale" not in open(md).read() and not any(r.stale(frozenset()) for r in _rows())


def test_format_2_rows_are_stale_only_for_stain_normalised_settings(tmp_path):
    # Format 3 added a term (the colours as scanned) to stain-normalised nets only.
    rows = [dataclasses.replace(r, ood_format=2) for r in _rows()]
    assert not any(r.stale(frozenset({"reinhard"})) for r in rows)  # their setting is "none"
    assert all(r.stale(frozenset({"none"})) for r in rows)
    md = str(tmp_path / "results.md")
    dr.write_markdown(md, rows, ("none",), "about", frozenset({"reinhard"}))
    assert "stale" not in open(md).read()
    dr.write_markdown(md, rows, ("none",), "about", frozenset({"none"}))
    assert f"**{len(rows)} of the {len(rows)} rows" in open(md).read()
    assert "NCT tiles 100.0%, CMU slide 90.0% (≥ 90%: **met**): stale" in open(md).read()
    assert "stale" not in "".join(dr.targets(rows, ("none",), "student_x8"))

"""kd-histo-predict at cohort scale (issue 29 Deliver 1 and 2): memory stays flat in the number of
inputs, and three tasks of a job array plus a merge write exactly what one process writes."""

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from support import REPO

from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli

from .test_cohort import _slide, _tree

pytestmark = pytest.mark.reliability


def _tile_folders(root, n: int, per: int = 4) -> list[str]:
    """``n`` folders of ``per`` 32 px PNG tiles (one input, one "slide" each)."""
    tiles = []
    for seed in range(per):
        buf = io.BytesIO()
        rgb = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(buf, format="PNG")
        tiles.append(buf.getvalue())
    out = []
    for i in range(n):
        folder = root / f"case{i:04d}"
        folder.mkdir(parents=True)
        for k, data in enumerate(tiles):
            (folder / f"t{k}.png").write_bytes(data)
        out.append(str(folder))
    return out


# One predict of argv[3:] after a warm-up, in a fresh interpreter: within the test session,
# other tests' leftover threads, caches and captured output allocate while tracemalloc watches.
_CHILD = textwrap.dedent("""
    import sys, tracemalloc
    from kd_histo.evaluation import predict
    run, warm, out, *inputs = sys.argv[1:]
    def cfg(ins, to):
        return predict.PredictConfig(model_dir=run, inputs=tuple(ins), out_dir=to, num_workers=0)
    predict.predict(cfg(inputs[:2], warm))
    tracemalloc.start()
    predict.predict(cfg(inputs, out))
    print(tracemalloc.get_traced_memory()[1])
""")


def _traced_peak(run, inputs, out) -> int:
    """Peak bytes Python and NumPy allocate during one predict of ``inputs`` (tracemalloc), in
    a child interpreter after a warm-up predict of two of them."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, run, f"{out}_warm", str(out), *inputs],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_memory_stays_flat_in_the_number_of_inputs(teacher_run, tmp_path):
    small = _traced_peak(teacher_run, _tile_folders(tmp_path / "a", 50), tmp_path / "out_a")
    large = _traced_peak(teacher_run, _tile_folders(tmp_path / "b", 200), tmp_path / "out_b")
    assert len(open(tmp_path / "out_b" / "slides.csv").readlines()) == 201
    # The margin: 150 more inputs may add what the cohort keeps per input by design (its entry
    # in the input list and in slides.csv's index: a few hundred bytes each, ~0.1 MB in all),
    # never a slide's tiles. Keeping every input's results until the end, as predict did before
    # streaming, measured 41 KB per input here (3.5 MB at 50 inputs, 9.7 MB at 200); eager
    # TensorFlow calls per batch, ~5 KB per input.
    assert large - small < 150 * 1024, (small, large)


def test_three_tasks_and_a_merge_write_what_one_process_writes(teacher_run, tmp_path, capsys):
    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    # five slides of different sizes, so shares by size differ from shares by count
    slides = [_slide(slides_dir / f"s{i}.tif", w, seed=i) for i, w in enumerate([512, 256] * 2)]
    slides.append(_slide(slides_dir / "s4.tif", 768, seed=4))
    folders = _tile_folders(tmp_path / "tiles", 1)

    def argv(out, *extra):
        return [
            f"--model_dir={teacher_run}",
            f"--inputs={','.join(slides + folders)}",
            f"--out_dir={out}",
            "--read_mpp=0.5",
            "--num_workers=0",
            "--heatmap",
            *extra,
        ]

    def run(*args) -> tuple[int, str]:
        capsys.readouterr()
        code = fc.invoke(predict_cli.PROG, predict_cli.main, list(args))
        said = capsys.readouterr()
        return code, said.out + said.err

    assert run(*argv(tmp_path / "one"))[0] == 0
    shared = tmp_path / "shared"
    tasks = ["--num_tasks=3", "--task_index={}"]
    for i in (2, 0):
        code, said = run(*argv(shared, tasks[0], tasks[1].format(i)))
        assert code == 0 and f"task {i} of 3 done" in said, said
        assert not (shared / "predictions.csv").exists()
    code, said = run("--merge", f"--out_dir={shared}")
    assert code == 2 and "task 1 of 3" in said and "task 0" not in said, said
    assert len(said.strip().splitlines()) == 1
    assert run(*argv(shared, tasks[0], tasks[1].format(1)))[0] == 0
    code, said = run("--merge", f"--out_dir={shared}")
    assert code == 0, said
    one, merged = _tree(tmp_path / "one"), _tree(shared)
    assert merged.pop("cohort.json") != one.pop("cohort.json")  # it records the number of tasks
    assert merged == one
    assert {"predictions.csv", "slides.csv", "s4.geojson", "s4_probabilities.ome.tif"} <= set(one)

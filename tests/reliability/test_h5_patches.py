"""HDF5 patches of another type than uint8 (issue 31, case 9): float32, float64 or uint16 patches
were each skipped, giving an empty data set with exit 0 (the reason only in dataset.json); the
file is now refused up front in one line naming it, its type and the fix."""

import numpy as np
import pytest

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import flags_common as fc

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_hdf5_patches_that_are_not_uint8_are_one_line(tmp_path, capsys, dtype):
    h5py = pytest.importorskip("h5py", reason="h5py writes the test's HDF5 file")
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3)).astype(dtype)
    with h5py.File(tmp_path / "p_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "p_y.h5", "w") as f:
        f["y"] = np.array([0, 1, 0, 1, 1, 0], np.uint8)
    code = fc.invoke(
        convert_cli.PROG,
        convert_cli.main,
        [
            f"--h5_images={tmp_path / 'p_x.h5'}",
            f"--h5_labels={tmp_path / 'p_y.h5'}",
            f"--out_dir={tmp_path / 'o'}",
            "--tile_px=16",
            "--num_workers=0",
            "--progress=false",
            "--split_fractions=0.5,0.25,0.25",
        ],
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{convert_cli.PROG}: error:") and "Traceback" not in err, err
    assert str(tmp_path / "p_x.h5") in last and np.dtype(dtype).name in last, last
    assert "uint8" in last
    assert not (tmp_path / "o" / "dataset.json").exists()

"""The real H&E data in ../shared/data convert completely (a sample here; all 6000 LC25000 tiles
in the large test): examples = inputs - skips, and dataset.json counts match the shards."""

import os

import pytest

from kd_histo.convert import ConvertConfig, EncodeOptions, convert

from .helpers import check_split_counts, read_split


def _check_complete(out, info, n_inputs):
    assert check_split_counts(str(out), info) == n_inputs - len(info.skipped)


@pytest.mark.realdata
def test_nct_tiffs_and_lc25000_sample_convert_completely(shared_data, tmp_path):
    src = tmp_path / "src"
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        names = sorted(os.listdir(shared_data / "lc25000_lung" / cls))[:10]
        os.makedirs(src / cls)
        for n in names:  # symlinks: the real data is never copied into the project
            os.symlink(shared_data / "lc25000_lung" / cls / n, src / cls / n)
    nct = sorted(os.listdir(shared_data / "nct_crc_he_samples"))
    os.makedirs(src / "nct")
    for n in nct:
        os.symlink(shared_data / "nct_crc_he_samples" / n, src / "nct" / n)
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            input_dir=str(src),
            encode=EncodeOptions(tile_px=224),
            group_by="phash",
        )
    )
    _check_complete(tmp_path / "out", info, 30 + len(nct))
    assert info.skipped == [] and info.class_names == ["lung_aca", "lung_n", "lung_scc", "nct"]


@pytest.mark.realdata
def test_nct_tiff_decoding_with_tensorflow_io_matches_pillow(shared_data, tmp_path):
    import numpy as np

    from kd_histo.convert import tiles

    for n in sorted(os.listdir(shared_data / "nct_crc_he_samples"))[:3]:
        path = str(shared_data / "nct_crc_he_samples" / n)
        np.testing.assert_array_equal(
            tiles.read_tile(path, decoder="tfio")[0], tiles.read_tile(path)[0]
        )


@pytest.mark.large
@pytest.mark.realdata
def test_all_lc25000_tiles_convert_with_phash_groups(shared_data, tmp_path):
    src = shared_data / "lc25000_lung"
    n_inputs = sum(len(os.listdir(src / c)) for c in os.listdir(src))
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path),
            input_dir=str(src),
            encode=EncodeOptions(tile_px=224),
            group_by="phash",
            num_workers=2,
        )
    )
    _check_complete(tmp_path, info, n_inputs)
    slides_of = {s: {r["slide_id"] for r in read_split(str(tmp_path), s)} for s in info.counts}
    assert not (slides_of["train"] & slides_of["test"] or slides_of["train"] & slides_of["val"])
    assert not slides_of["val"] & slides_of["test"]

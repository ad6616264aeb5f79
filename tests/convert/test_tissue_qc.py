"""Tissue detection (Otsu, morphology, specks) and the qc picture, on synthetic and real slides."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from PIL import Image

from kd_histo.convert import ConvertConfig, EncodeOptions, convert, qc, slides, tissue

from .pyramid_tiff import write_pyramid_tiff

MPP = 0.5  # µm/px of the synthetic slide's level 0
H, W = 1536, 2048  # level 0; the 1024 px thumbnail is its level 1 (downsample 2)


def _disc(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    """H&E-like tissue of known area on noisy glass, with specks that are not tissue.

    Returns (path, truth, specks): truth is the level-0 tissue mask (large pieces), specks the
    level-0 mask of stained dust (isolated pixels and small flecks, each < 10,000 µm²).
    """
    rng = np.random.default_rng(0)
    img = rng.normal(242, 3, (H, W, 3))  # glass, chroma a few units
    truth = _disc(450, 500, 300) | _disc(1100, 1500, 220)
    truth[1000:1350, 250:800] = True  # a 550 x 350 px slab (275 x 175 µm)
    pale = np.zeros_like(truth)
    pale[150:550, 1250:1800] = True  # a paler piece: eosin only
    truth |= pale
    pink = np.array([228, 140, 195]) + rng.normal(0, 12, (H, W, 3))
    purple = np.array([120, 60, 150]) + rng.normal(0, 10, (H, W, 3))  # nuclei
    nuclei = rng.random((H, W)) < 0.15
    tissue_rgb = np.where(nuclei[..., None], purple, pink)
    pale_rgb = np.array([238, 185, 215]) + rng.normal(0, 6, (H, W, 3))
    img = np.where(truth[..., None], tissue_rgb, img)
    img = np.where(pale[..., None], pale_rgb, img)
    specks = np.zeros_like(truth)
    for cy, cx in ((100, 100), (1450, 1000), (800, 1000), (700, 1900)):
        specks[cy : cy + 40, cx : cx + 40] = True  # 20 x 20 µm flecks = 400 µm²
    dust = (rng.random((H, W)) < 0.002) & ~truth  # isolated stained pixels
    specks |= dust
    img = np.where(specks[..., None] & ~truth[..., None], purple, img)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    path = str(tmp_path_factory.mktemp("tissue") / "known.tif")
    write_pyramid_tiff(path, img, MPP, levels=3, tile=256)
    return path, truth, specks & ~truth


def _thumb(path):
    import openslide

    s = openslide.OpenSlide(path)
    try:
        return slides.thumbnail(s)
    finally:
        s.close()


def test_otsu_mask_area_is_within_2_percent_of_the_true_tissue_area(synthetic_slide):
    path, truth, specks = synthetic_slide
    thumb = _thumb(path)
    assert thumb.shape[:2] == (H // 2, W // 2)
    px_um2 = (2 * MPP) ** 2  # one thumbnail pixel
    found = tissue.detect(thumb, "otsu", min_area_px=10_000 / px_um2)
    true_um2 = truth.sum() * MPP**2
    got_um2 = found.mask.sum() * px_um2
    assert abs(got_um2 - true_um2) / true_um2 < 0.02, (got_um2, true_um2)
    # The specks are gone: no mask pixel lies on a speck away from the tissue.
    small_truth = truth[::2, ::2]
    small_specks = specks[::2, ::2]
    assert not (found.mask & small_specks).any()
    # ...and removing them was the speck filter's work: without it the flecks are kept.
    unfiltered = tissue.detect(thumb, "otsu", min_area_px=0)
    assert (unfiltered.mask & small_specks).sum() >= 4 * 15 * 15
    # The mask is the tissue, pixel for pixel, but for a border of about one thumbnail pixel.
    assert (found.mask != small_truth).mean() < 0.01
    # Otsu's threshold lies between the glass's chroma and the pale piece's.
    c = tissue.chroma(thumb)
    glass = ~(small_truth | small_specks)
    assert np.percentile(c[glass], 99.9) < found.threshold < np.percentile(c[small_truth], 1)
    # The fixed rule (no morphology, no speck filter) misses the 2% on this slide (+2.6%).
    fixed_um2 = tissue.detect(thumb, "threshold").mask.sum() * px_um2
    assert abs(fixed_um2 - true_um2) / true_um2 > 0.02


def test_fixed_threshold_keeps_the_specks(synthetic_slide):
    path, _, specks = synthetic_slide
    fixed = tissue.detect(_thumb(path), "threshold")
    assert fixed.method == "threshold" and fixed.threshold == 20
    np.testing.assert_array_equal(fixed.mask, tissue.is_tissue(_thumb(path)))
    assert (fixed.mask & specks[::2, ::2]).sum() > 0


def _otsu_reference(values: np.ndarray) -> int:
    """Brute force: every split t, the between-class variance from the two classes' values."""
    v = values.ravel().astype(np.float64)
    best, best_t = -1.0, 0
    for t in range(255):
        lo, hi = v[v <= t], v[v > t]
        if len(lo) == 0 or len(hi) == 0:
            continue
        var = len(lo) / len(v) * len(hi) / len(v) * (lo.mean() - hi.mean()) ** 2
        if var > best * (1 + 1e-12):
            best, best_t = var, t
    return best_t


@pytest.mark.parametrize("seed", range(6))
def test_otsu_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    share = rng.uniform(0.05, 0.95)
    a = rng.normal(rng.uniform(0, 80), rng.uniform(1, 20), n)
    b = rng.normal(rng.uniform(90, 250), rng.uniform(1, 30), n)
    values = np.clip(np.where(rng.random(n) < share, a, b), 0, 255).astype(np.uint8)
    got, want = tissue.otsu_threshold(values), _otsu_reference(values)
    # Thresholds between two present values split them alike: compare the splits.
    np.testing.assert_array_equal(values > got, values > want)


def test_otsu_of_constant_values_is_zero():
    assert tissue.otsu_threshold(np.full(10, 7, np.uint8)) == 0


def _morph_reference(mask, radius, op):
    se = tissue.disk(radius)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            vals = []
            for dy, dx in zip(*np.nonzero(se)):
                yy, xx = y + dy - radius, x + dx - radius
                inside = 0 <= yy < h and 0 <= xx < w
                vals.append(mask[yy, xx] if inside else op == "erode")
            out[y, x] = any(vals) if op == "dilate" else all(vals)
    return out


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_dilate_and_erode_match_an_explicit_loop(radius):
    mask = np.random.default_rng(radius).random((17, 23)) < 0.4
    se = tissue.disk(radius)
    np.testing.assert_array_equal(tissue.dilate(mask, se), _morph_reference(mask, radius, "dilate"))
    np.testing.assert_array_equal(tissue.erode(mask, se), _morph_reference(mask, radius, "erode"))


def test_close_open_fills_pinholes_and_drops_isolated_pixels():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[15, 15] = False  # a pinhole
    mask[36, 36] = True  # an isolated pixel
    got = tissue.close_open(mask, 2)
    assert got[15, 15] and not got[36, 36]
    square = np.zeros_like(mask)
    square[5:30, 5:30] = True
    # The disk rounds the square's corners (at most 3 x 3 px each) and adds nothing outside it.
    assert not (got & ~square).any() and got[8:27, 5:30].all() and got[5:30, 8:27].all()
    assert got.sum() >= 25 * 25 - 4 * 9


def _bfs_labels(mask):
    h, w = mask.shape
    lab = np.zeros((h, w), int)
    n = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not lab[i, j]:
                n += 1
                lab[i, j] = n
                queue = collections.deque([(i, j)])
                while queue:
                    y, x = queue.popleft()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            yy, xx = y + dy, x + dx
                            if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not lab[yy, xx]:
                                lab[yy, xx] = n
                                queue.append((yy, xx))
    return lab, n


@pytest.mark.parametrize("seed", range(8))
def test_components_match_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
    got, n_got = tissue.label_components(mask)
    want, n_want = _bfs_labels(mask)
    assert n_got == n_want
    assert ((got > 0) == mask).all()
    # The same partition: two pixels share a label in one labelling iff they do in the other.
    g, w = got[mask], want[mask]
    np.testing.assert_array_equal(g[:, None] == g[None, :], w[:, None] == w[None, :])
    area = np.bincount(want.ravel())
    keep = area >= 5
    keep[0] = False
    np.testing.assert_array_equal(tissue.remove_small(mask, 5), keep[want])


def _colour_at(img, x, y):
    return tuple(int(c) for c in img[y, x])


def test_conversion_writes_the_qc_picture_with_kept_and_dropped_tiles(synthetic_slide, tmp_path):
    path, truth, _ = synthetic_slide
    out = tmp_path / "out"
    enc = EncodeOptions(tile_px=128, target_mpp=1.0)  # 256 level-0 px, 8 x 6 grid
    info = convert(ConvertConfig(out_dir=str(out), slides=(path,), encode=enc))
    pic = out / "qc" / "known.png"
    assert pic.is_file() and not [n for n in os.listdir(out / "qc") if ".tmp-" in n]
    img = np.asarray(Image.open(pic).convert("RGB"))
    assert img.shape[1] == W // 2 and img.shape[0] >= H // 2
    plan = slides.plan_slide(path, 128, 1.0, tissue_method="otsu", min_tissue_area=10_000)
    kept, dropped = qc.grid_boxes(plan)
    assert len(kept) == info.counts["unlabeled"]["unlabeled"] and kept and dropped
    for x, y in kept:  # top-left corner of each box, in thumbnail pixels
        assert _colour_at(img, x // 2, y // 2) == qc.KEPT
        assert truth[y : y + 256, x : x + 256].mean() >= 0.4  # kept tiles lie on tissue
    for x, y in dropped:
        corner = _colour_at(img, x // 2, y // 2)
        # a corner shared with a kept tile is drawn green over the red
        assert corner == qc.DROPPED or (corner == qc.KEPT and _touches(kept, x, y, 256))
    for x, y in dropped:
        assert truth[y : y + 256, x : x + 256].mean() <= 0.6
    # Inside a box the thumbnail is untouched.
    x, y = kept[0]
    thumb = _thumb(path)
    np.testing.assert_array_equal(img[y // 2 + 5, x // 2 + 5], thumb[y // 2 + 5, x // 2 + 5])
    notes = " ".join(json.loads((out / "dataset.json").read_text())["notes"])
    assert "tissue by otsu" in notes


def _touches(boxes, x, y, size):
    return any(abs(bx - x) <= size and abs(by - y) <= size for bx, by in boxes)


def test_noqc_writes_no_picture_and_qc_is_not_in_the_fingerprint(synthetic_slide, tmp_path):
    path, _, _ = synthetic_slide
    enc = EncodeOptions(tile_px=128, target_mpp=2.0)
    cfg = ConvertConfig(out_dir=str(tmp_path), slides=(path,), encode=enc, qc=False)
    convert(cfg)
    assert not (tmp_path / "qc").exists()
    assert (
        cfg.fingerprint()
        == ConvertConfig(out_dir=str(tmp_path), encode=enc, slides=(path,)).fingerprint()
    )
    other = EncodeOptions(tile_px=128, target_mpp=2.0, tissue_method="threshold")
    assert (
        cfg.fingerprint()
        != ConvertConfig(out_dir=str(tmp_path), slides=(path,), encode=other).fingerprint()
    )


def test_annotation_outlines_are_drawn_per_class():
    thumb = np.full((100, 200, 3), 255, np.uint8)
    ring = np.array([[100, 100], [300, 100], [300, 160], [100, 160], [100, 100]], float)
    other = np.array([[20, 20], [60, 20], [60, 60]], float)
    img = qc.draw(thumb, (400, 200), 50, [], [], [("tumour", [ring]), ("stroma", [other])])
    blue, orange = qc.CLASS_COLOURS[0][1], qc.CLASS_COLOURS[1][1]
    assert _colour_at(img, 100, 50) == blue and _colour_at(img, 50, 65) == blue  # edges, scaled
    assert _colour_at(img, 100, 65) == (255, 255, 255)  # inside the ring: untouched
    assert _colour_at(img, 20, 10) == orange


@pytest.mark.realdata
def test_real_slide_converts_with_otsu_and_a_qc_picture(shared_data, tmp_path):
    svs = str(shared_data / "slides" / "CMU-1-Small-Region.svs")
    out = tmp_path / "cmu"
    info = convert(
        ConvertConfig(
            out_dir=str(out), slides=(svs,), encode=EncodeOptions(tile_px=224, target_mpp=0.5)
        )
    )
    pic = out / "qc" / "CMU-1-Small-Region.png"
    img = np.asarray(Image.open(pic).convert("RGB"))
    thumb = _thumb(svs)
    assert img.shape[1] == thumb.shape[1] and img.shape[0] == thumb.shape[0] + qc.LEGEND_PX
    plan = slides.plan_slide(svs, 224, 0.5, tissue_method="otsu", min_tissue_area=10_000)
    kept, dropped = qc.grid_boxes(plan)
    assert len(kept) == info.counts["unlabeled"]["unlabeled"] > 0 and dropped
    is_kept = (img == qc.KEPT).all(-1)
    is_dropped = (img == qc.DROPPED).all(-1)
    assert is_kept.sum() > 100 and is_dropped.sum() > 100
    # Otsu and the fixed rule, two independent rules, agree on this slide's tissue.
    (width, height), (th, tw) = plan.dims, thumb.shape[:2]
    otsu = tissue.detect(thumb, "otsu", 10_000 / plan.base_mpp**2 * (th / height) * (tw / width))
    fixed = tissue.is_tissue(thumb)
    iou = (otsu.mask & fixed).sum() / (otsu.mask | fixed).sum()
    assert iou > 0.8, iou
    assert otsu.threshold == plan.tissue_threshold
    assert plan.tissue_fraction == pytest.approx(otsu.fraction)
    print(
        f"CMU-1-Small-Region: otsu chroma threshold {plan.tissue_threshold}, tissue "
        f"{plan.tissue_fraction:.1%} of the thumbnail, {len(kept)} of {plan.grid_tiles} tiles kept"
        f" (fixed rule {slides.plan_slide(svs, 224, 0.5).coords.__len__()}), IoU {iou:.3f}"
    )


def test_flags_set_tissue_and_qc(tmp_path):
    from absl import flags

    from kd_histo.cli import convert as cli

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["kd-histo-convert", f"--out_dir={tmp_path}", "--slides=a.svs"])
        cfg = cli.config_from_flags()
        assert cfg.qc and cfg.encode.tissue_method == "otsu"
        assert cfg.encode.min_tissue_area == 10_000
        flags.FLAGS.unparse_flags()
        argv = ["kd-histo-convert", f"--out_dir={tmp_path}", "--noqc", "--min_tissue_area=50"]
        flags.FLAGS([*argv, "--tissue_method=threshold"])
        cfg = cli.config_from_flags()
        assert not cfg.qc and cfg.encode.tissue_method == "threshold"
        assert cfg.encode.min_tissue_area == 50
    finally:
        flags.FLAGS.unparse_flags()


def test_bad_tissue_settings_end_in_one_line(synthetic_slide, tmp_path):
    from kd_histo.convert import ConversionError

    path, _, _ = synthetic_slide
    for enc in (EncodeOptions(tissue_method="magic"), EncodeOptions(min_tissue_area=-1.0)):
        with pytest.raises(ConversionError, match="--tissue_method in otsu, threshold"):
            convert(ConvertConfig(out_dir=str(tmp_path), slides=(path,), encode=enc))


def test_only_the_task_converting_a_slide_writes_its_picture(synthetic_slide, tmp_path):
    from kd_histo.convert import plan as plan_lib
    from kd_histo.convert import run_task

    path, _, _ = synthetic_slide
    owner = plan_lib.task_of("known", 2)
    enc = EncodeOptions(tile_px=128, target_mpp=2.0)
    for task in (1 - owner, owner):
        out = tmp_path / f"t{task}"
        run_task(
            ConvertConfig(
                out_dir=str(out), slides=(path,), encode=enc, num_tasks=2, task_index=task
            )
        )
        assert (out / "qc" / "known.png").exists() == (task == owner)


def test_blank_glass_has_no_tissue():
    glass = np.clip(np.random.default_rng(1).normal(240, 3, (200, 300, 3)), 0, 255)
    found = tissue.detect(glass.astype(np.uint8), "otsu", min_area_px=50)
    assert found.threshold >= tissue.OTSU_MIN_CHROMA and not found.mask.any()

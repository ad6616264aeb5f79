"""kd-histo-predict: a trained network on new tiles, converted shards or whole-slide images.

    kd-histo-predict --model_dir=runs/demo/student_x4 --inputs=../shared/data/slide.svs \
        --heatmap --max_tiles=200 --out_dir=runs/demo/predict
    kd-histo-predict --model_dir=runs/demo/student_x4 --inputs=../shared/data/slide.svs \
        --cascade_teacher=runs/demo/teacher --cascade_fraction=0.1 \
        --out_dir=runs/demo/predict_cascade

Writes predictions.csv (per tile), slides.csv (per slide) and, per slide, <slide>.geojson (tile
objects for QuPath: File > Import objects) and <slide>_probabilities.ome.tif (a pyramidal
probability map, one channel per class); with --heatmap (or --heatmap_classes=a,b) heatmap PNGs
over its thumbnail (``kd_histo.evaluation.prediction_files``). With --cascade_teacher the teacher
re-scores the least confident tiles of each slide from their HR tiles (predictions.csv says which
net scored each). --read_mpp overrides the µm/px the run was trained at (run.json); --slide_mpp
gives a slide's level-0 µm/px when its metadata lacks it. Inputs may be quoted globs
('slides/*.svs') or lines of --inputs_file; folders are searched for slides as well as tiles.
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc
from kd_histo.evaluation.predict import PredictConfig

PROG = "kd-histo-predict"
CONFIGS = (PredictConfig,)
fc.define_binary_flags(CONFIGS)


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import predict

    cfg = PredictConfig(**fc.config_kwargs(PredictConfig))
    paths = predict.predict(cfg, log=fc.log)
    for name, path in paths.items():
        print(f"{PROG}: {name} -> {path}")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()

"""kd-histo-predict: a trained network on new tiles, converted shards or whole-slide images.

    kd-histo-predict --model_dir=runs/demo/student_x4 --inputs=../shared/data/slide.svs \
        --heatmap --max_tiles=200 --out_dir=runs/demo/predict
    kd-histo-predict --model_dir=runs/demo/student_x4 --inputs=../shared/data/slide.svs \
        --cascade_teacher=runs/demo/teacher --cascade_fraction=0.1 \
        --out_dir=runs/demo/predict_cascade
    # a cohort on a job array (docs/cohorts.md): each task its share, then one merge
    kd-histo-predict ... --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=8 --out_dir=cohort
    kd-histo-predict --merge --out_dir=cohort

Writes predictions.csv (per tile), slides.csv (per slide) and, per slide, <slide>.geojson (tile
objects for QuPath: File > Import objects) and <slide>_probabilities.ome.tif (a pyramidal
probability map, one channel per class); with --heatmap (or --heatmap_classes=a,b) heatmap PNGs
over its thumbnail (``kd_histo.evaluation.prediction_files``). Each input is written when it
finishes (parts/ holds its pieces): rerunning the same command resumes
(``kd_histo.evaluation.cohort``). With --cascade_teacher the teacher re-scores the least
confident tiles of each slide from their HR tiles (predictions.csv says which net scored each).
--read_mpp overrides the µm/px the run was trained at (run.json); --slide_mpp gives a slide's
level-0 µm/px when its metadata lacks it. Inputs may be quoted globs ('slides/*.svs') or lines of
--inputs_file; folders are searched for slides as well as tiles.
"""

from __future__ import annotations

import dataclasses

from kd_histo.cli import flags_common as fc
from kd_histo.evaluation.predict import PredictConfig

PROG = "kd-histo-predict"
CONFIGS = (PredictConfig,)
OWN_FLAGS = ("merge",)
fc.define_binary_flags(CONFIGS, OWN_FLAGS)


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import cohort, predict

    if fc.FLAGS.merge:
        default = {f.name: f.default for f in dataclasses.fields(PredictConfig)}["out_dir"]
        paths = cohort.merge(fc.FLAGS.out_dir or default)
    else:
        cfg = PredictConfig(**fc.config_kwargs(PredictConfig))
        paths = predict.predict(cfg, log=fc.log)
        if cfg.num_tasks > 1:
            print(
                f"{PROG}: task {cfg.task_index} of {cfg.num_tasks} done in {cfg.out_dir}; "
                "run --merge once all tasks are done"
            )
    for name, path in paths.items():
        print(f"{PROG}: {name} -> {path}")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()

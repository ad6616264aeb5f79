"""kd-histo-predict: a trained network on new tiles, converted shards or whole-slide images.

    kd-histo-predict --model_dir=runs/demo/student_x4 --inputs=../shared/data/slide.svs \
        --heatmap --max_tiles=200 --out_dir=runs/demo/predict
    kd-histo-predict --model_dir=runs/demo/student_x4 --inputs=../shared/data/slide.svs \
        --cascade_teacher=runs/demo/teacher --cascade_fraction=0.1 --out_dir=runs/demo/predict_cascade

Writes predictions.csv (per tile), slides.csv (per slide) and, with --heatmap, one heatmap PNG
per slide over its thumbnail (``kd_histo.evaluation.predict``). With --cascade_teacher the teacher re-scores
the least confident tiles of each slide from their HR tiles (predictions.csv says which net scored each).
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc

PROG = "kd-histo-predict"
fc.define_predict_flags()
FLAGS = fc.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import predict
    fc.require(model_dir=FLAGS.model_dir, inputs=FLAGS.inputs)
    cfg = predict.PredictConfig(model_dir=FLAGS.model_dir, inputs=tuple(FLAGS.inputs),
                                out_dir=FLAGS.out_dir or "predictions",
                                split=FLAGS.split, batch_size=FLAGS.batch_size, target_mpp=FLAGS.target_mpp if FLAGS["target_mpp"].present else 0.0,
                                min_tissue=FLAGS.min_tissue, max_tiles=FLAGS.max_tiles, heatmap=FLAGS.heatmap,
                                num_workers=FLAGS.num_workers,
                                cascade_teacher=FLAGS.cascade_teacher, cascade_fraction=FLAGS.cascade_fraction,
                                cascade_threshold=FLAGS.cascade_threshold, skip_corrupt=FLAGS.skip_corrupt)
    paths = predict.predict(cfg, log=lambda line: print(f"{PROG}: {line}", flush=True))
    for name, path in paths.items():
        print(f"{PROG}: {name} -> {path}")


def run() -> None:
    fc.run(PROG, main)


if __name__ == "__main__":
    run()

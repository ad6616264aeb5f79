"""kd-histo-export: a run's network as a deployable model with its preprocessing in the graph.

    kd-histo-export --model_dir=runs/demo/student_x4 --format=savedmodel \
        --out=runs/demo/student_x4_savedmodel
    kd-histo-export --model_dir=runs/demo/student_x4 --format=tflite --quantize=int8 \
        --out=runs/demo/student_x4_int8
    kd-histo-predict --model=runs/demo/student_x4_int8 --inputs=../shared/data/slide.svs

The model takes uint8 tiles read at the run's µm/px (signature ``serving_default``) or HR tiles
it shrinks by the run's factor (``hr``), normalises them as training did (the run's stain
normalisation included) and returns class probabilities; run.json and export.json (format,
quantization, input contract) lie beside it (``kd_histo.evaluation.export``).
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc
from kd_histo.evaluation.export import ExportConfig

PROG = "kd-histo-export"
CONFIGS = (ExportConfig,)
fc.define_binary_flags(CONFIGS)


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import export

    cfg = ExportConfig(**fc.config_kwargs(ExportConfig))
    print(f"{PROG}: {cfg.format} ({cfg.quantize}) -> {export.export(cfg)}")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()

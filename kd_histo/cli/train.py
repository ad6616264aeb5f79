"""kd-histo-train: trains a teacher, a low-resolution baseline, or a distilled student.

    kd-histo-train --flagfile=flags/demo/teacher.flags
    kd-histo-train --flagfile=flags/demo/student_x4.flags --teacher=runs/demo/teacher

Flags -> a frozen ``kd_histo.training.config.RunConfig`` -> ``kd_histo.training.train.train``. Bad input ends in
one line, ``kd-histo-train: error: <what to fix>``, exit code 2, and nothing written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_histo.cli import flags_common as fc

if TYPE_CHECKING:  # the binary imports TensorFlow only once the flags are parsed
    from kd_histo.training.config import RunConfig

PROG = "kd-histo-train"
fc.define_train_flags()
FLAGS = fc.FLAGS


def config_from_flags(mode: str | None = None, model_dir: str | None = None) -> "RunConfig":
    """The RunConfig the flags describe (``--smoke`` shrinks it).

    Args:
      mode: overrides --mode (kd-histo-experiment builds its run template this way).
      model_dir: overrides --model_dir.
    """
    from kd_histo.data.pipeline import PipelineConfig
    from kd_histo.training.config import DistillConfig, NetConfig, OptimConfig, RunConfig, smoke

    mode, model_dir = mode or FLAGS.mode, model_dir or FLAGS.model_dir
    fc.require(mode=mode, data_dir=FLAGS.data_dir, model_dir=model_dir)
    data = PipelineConfig(
        data_dir=FLAGS.data_dir, batch_size=FLAGS.batch_size, factor=FLAGS.factor, hr_px=FLAGS.hr_px,
        lr_method=FLAGS.lr_method, augment=FLAGS.augment, unlabeled_ratio=FLAGS.unlabeled_ratio,
        labeled=FLAGS.labeled, cache=FLAGS.cache, unlabeled_dirs=tuple(FLAGS.unlabeled_dirs), seed=FLAGS.seed,
        skip_corrupt=FLAGS.skip_corrupt)
    net_kwargs = (("stem", FLAGS.stem), ("norm", FLAGS.norm)) if FLAGS.arch == "resnet_gn" else (("norm", FLAGS.norm),)
    net = NetConfig(arch=FLAGS.arch, planes=fc.int_list(FLAGS.planes, "planes"), kwargs=net_kwargs)
    distill = DistillConfig(
        teacher=FLAGS.teacher, temperature=FLAGS.temperature, kd_weight=FLAGS.kd_weight,
        feature_weight=FLAGS.feature_weight, feature_mode=FLAGS.feature_mode, feature_norm=FLAGS.feature_norm,
        ce_weight=FLAGS.ce_weight, ssl_weight=FLAGS.ssl_weight, at_weight=FLAGS.at_weight,
        accumulation_steps=FLAGS.accumulation_steps, teacher_cache=FLAGS.teacher_cache)
    optim = OptimConfig(name=FLAGS.optimizer, learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay,
                        schedule=FLAGS.schedule, decay_rate=FLAGS.decay_rate, warmup_epochs=FLAGS.warmup_epochs)
    profile = fc.int_list(FLAGS.profile_steps, "profile_steps")
    if len(profile) != 2:
        raise ValueError(f"--profile_steps takes two integers first,last; got {FLAGS.profile_steps}")
    cfg = RunConfig(
        mode=mode, model_dir=model_dir, data=data, net=net, distill=distill, optim=optim,
        epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps_per_epoch, val_steps=FLAGS.val_steps,
        precision=FLAGS.precision, strategy=FLAGS.strategy, seed=FLAGS.seed, resume=FLAGS.resume,
        monitor=FLAGS.monitor, allow_no_val=FLAGS.allow_no_val, profile_steps=profile, verbose=FLAGS.verbose)
    return smoke(cfg) if FLAGS.smoke else cfg


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.training import train
    cfg = config_from_flags()
    result = train.train(cfg)
    best = f", best {cfg.monitor} {result.best:.4f}" if result.best is not None else ""
    print(f"{PROG}: {cfg.mode} trained for {cfg.epochs} epochs{best}; model at {result.model_path}")


def run() -> None:
    fc.run(PROG, main)


if __name__ == "__main__":
    run()

"""The typed configuration of one training run (``RunConfig``) and its JSON round trip.

A run is fully described by a frozen :class:`RunConfig`: the data pipeline
(:class:`kd_histo.data.pipeline.PipelineConfig`), the network (:class:`kd_histo.models.NetConfig`,
defined beside the builder), the distillation weights (:class:`DistillConfig`), the optimizer and
schedule (:class:`OptimConfig`), and the run itself (mode, precision, strategy, seed, epochs,
model_dir, resume). ``smoke()`` shrinks any config so it runs in seconds on a laptop (big_vision's
"runlocal" switch).

Not here: flag parsing (``kd_histo.cli``), building anything from the config
(``kd_histo.training.train``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.data.stain_norm import StainConfig
from kd_histo.models import NetConfig
from kd_histo.numbers import require_finite
from kd_histo.settings import check_choice, setting
from kd_histo.training import losses as L
from kd_histo.training.embedding import EMBEDDING_LOSS, EMBEDDING_LOSSES
from kd_histo.training.ensemble import ENSEMBLE_FEATURES

MODES = ("teacher", "baseline", "distill")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored", "multi_worker")
SCHEDULES = ("constant", "cosine", "exponential")
OPTIMIZERS = ("adam", "adamw", "sgd")
FEATURE_MODES = L.FEATURE_MODES  # the loss module defines them (and checks them, once)
FEATURE_NORMS = L.FEATURE_NORMS
MONITORS = ("val_accuracy", "val_loss")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Loss weights of the ResolutionDistiller (paper defaults: KD + feature loss, no labels).

    Attributes:
      teacher: path of the teacher's ``model.keras`` (or its run folder); distill mode only.
        Comma-separated paths: an ensemble teacher (:mod:`kd_histo.training.ensemble`).
      temperature: softmax temperature T of the KD term (scaled by T^2).
      kd_weight: weight of KL(teacher || student).
      feature_weight: weight of the feature-map loss.
      feature_mode: teacher map resized to the student's by "maxpool", "bicubic" or the mean of
      both.
      feature_norm: "l2" or "l1".
      ce_weight: weight of cross-entropy on labeled examples (1 for teacher/baseline training).
      ssl_weight: weight of the contrastive (InfoNCE) term between the student's (LR) and the
        teacher's (HR) pooled, projected features of the same tiles (the other tiles of the batch
        are the negatives).
      at_weight: weight of attention transfer.
      accumulation_steps: gradient accumulation.
      ensemble_features: an ensemble teacher's feature loss: "projected" (each member's map
        through its own 1x1 projection of the student's) or "off".
      embedding_loss: an embedding-only teacher's loss (``kd_histo.training.embedding``):
        "cosine" or "l2" between its embedding and the student's projected pooled map.
      teacher_cache: folder of a teacher-output cache (``kd_histo.training.teacher_cache``): the
      teacher
        runs once per tile and dihedral transform, and training reads its outputs instead of
        running it; "auto" = ``<model_dir>/teacher_cache``; "" = off. Needs augment "flips" or
        "none" and no random crop.
    """

    teacher: str = setting(
        "",
        "distill: the teacher's run folder or model.keras; several, comma-separated, distil from "
        "their ensemble (the mean of their probabilities at --temperature); or a Keras file or "
        "SavedModel with a teacher.json (docs/teachers.md).",
    )
    temperature: float = setting(L.KD_TEMPERATURE, "KD softmax temperature T (loss scaled by T^2).")
    kd_weight: float = setting(1.0, "Weight of KL(teacher || student).")
    feature_weight: float = setting(1.0, "Weight of the feature-map loss.")
    feature_mode: str = setting(
        L.FEATURE_MODE, "Teacher map resize: " + ", ".join(L.FEATURE_MODES) + "."
    )
    feature_norm: str = setting(
        L.FEATURE_NORM, "Feature loss norm: " + " or ".join(L.FEATURE_NORMS) + "."
    )
    ce_weight: float = setting(0.0, "distill: weight of cross-entropy on labeled tiles.")
    ssl_weight: float = setting(
        0.0, "distill: weight of the contrastive (InfoNCE) term between student and teacher."
    )
    at_weight: float = setting(0.0, "distill: weight of attention transfer.")
    accumulation_steps: int = setting(1, "Micro-batches per optimizer update.")
    teacher_cache: str = setting(
        "",
        "distill: folder of a teacher-output cache (built when missing; auto = "
        "<model_dir>/teacher_cache): the teacher runs once per tile and flip/rotation, not every "
        "epoch. Needs --augment=flips or none and no --hr_px crop.",
    )
    ensemble_features: str = setting(
        "projected",
        "Ensemble teacher: the feature loss matches each member's map through its own learned "
        "1x1 projection of the student's (projected), or is off (off).",
        choices=ENSEMBLE_FEATURES,
    )
    embedding_loss: str = setting(
        EMBEDDING_LOSS,
        "Embedding-only teacher (teacher.json without logits): the student's pooled features, "
        "linearly projected, match its embedding by cosine or l2 (replaces KD and the feature "
        "loss); a linear head is then fit on the labeled train tiles.",
        choices=EMBEDDING_LOSSES,
    )

    def __post_init__(self):
        require_finite(self)
        # the loss objects check their own parameters; building them here fails early, in one place
        L.LogitsKD(self.temperature)
        L.FeatureMapKD(self.feature_mode, self.feature_norm)
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        check_choice("ensemble_features", self.ensemble_features, ENSEMBLE_FEATURES)
        check_choice("embedding_loss", self.embedding_loss, EMBEDDING_LOSSES)

    @property
    def teachers(self) -> tuple[str, ...]:
        """The teacher runs: one, or the members of an ensemble (``teacher`` split at commas)."""
        return tuple(t.strip() for t in self.teacher.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (paper: Adam, lr 1e-3, weight decay 1e-4).

    Attributes:
      name: "adam" (L2-style decay through ``weight_decay``), "adamw" or "sgd" (momentum 0.9).
      learning_rate: peak learning rate.
      weight_decay: decoupled weight decay (Keras ``weight_decay`` argument).
      schedule: "constant", "cosine" (to 0 over the run) or "exponential" (``decay_rate`` per
      epoch).
      decay_rate: per-epoch factor of the exponential schedule.
      warmup_epochs: linear warm-up length (cosine only).
      clipnorm: global gradient-norm clip; 0 = off.
    """

    name: str = setting("adam", "adam, adamw or sgd.", flag="optimizer")
    learning_rate: float = setting(1e-3, "Peak learning rate (paper: 1e-3).")
    weight_decay: float = setting(1e-4, "Weight decay (paper: 1e-4).")
    schedule: str = setting("cosine", "Learning-rate schedule: constant, cosine, exponential.")
    decay_rate: float = setting(0.9, "Exponential schedule: factor per epoch.")
    warmup_epochs: float = setting(0.0, "Cosine schedule: linear warm-up length in epochs.")
    clipnorm: float = 0.0

    def __post_init__(self):
        require_finite(self)
        check_choice("optimizer", self.name, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one ``kd_histo.training.train.train`` call needs.

    Attributes:
      mode: "teacher" (labels, HR view), "baseline" (labels, LR view) or "distill" (frozen
        teacher on HR, student on LR).
      model_dir: run folder (config.json, run.json, model.keras, checkpoints/, backup/, logs/).
      data: the pipeline; ``data.factor`` is the student's / baseline's resolution factor.
      net: the network trained in this run.
      distill: distillation weights and the teacher path.
      optim: optimizer and schedule.
      stain: stain normalisation (its reference becomes the net's first layer).
      epochs: training epochs.
      steps_per_epoch: batches per epoch; 0 = one pass over the training split.
      val_steps: validation batches; 0 = the whole val split.
      precision: "float32", "mixed_float16" or "mixed_bfloat16".
      strategy: "default", "mirrored" (all local devices) or "multi_worker" (TF_CONFIG).
      seed: the one seed of weights and data order.
      resume: continue from ``backup/`` when present; False refuses to start in a used folder.
      monitor: validation metric that picks the best checkpoint.
      allow_no_val: train without a val split (the last epoch is then saved as the model).
      profile_steps: TensorBoard profile window, as (first, last) step; (0, 0) = off.
      image_grids: write HR/LR sample grids to TensorBoard once at the start.
      verbose: Keras progress bar (1), one line per epoch (2) or silent (0).
    """

    mode: str = setting(
        help="teacher (labels, HR), baseline (labels, LR), distill (teacher -> student).",
        choices=MODES,
    )
    model_dir: str = setting(help="Run folder to create (or resume).")
    data: PipelineConfig
    net: NetConfig = NetConfig()
    distill: DistillConfig = DistillConfig()
    optim: OptimConfig = OptimConfig()
    stain: StainConfig = StainConfig()
    epochs: int = setting(30, "Training epochs.")
    steps_per_epoch: int = setting(0, "Batches per epoch; 0 = one pass over the train split.")
    val_steps: int = setting(0, "Validation batches; 0 = the whole val split.")
    precision: str = setting("float32", "float32, mixed_float16 or mixed_bfloat16.")
    strategy: str = setting("default", "default, mirrored or multi_worker (TF_CONFIG).")
    seed: int = setting(0, "Seed of weights, data order and augmentation.")
    resume: bool = setting(True, "Continue an unfinished run found in model_dir.")
    monitor: str = setting(
        "val_accuracy", "Metric picking the best epoch: val_accuracy or val_loss."
    )
    allow_no_val: bool = setting(False, "Train without a val split (keeps the last epoch).")
    profile_steps: tuple[int, int] = setting(
        (2, 4), "TensorBoard profile window first,last step; 0,0 = off."
    )
    image_grids: bool = True
    verbose: int = setting(2, "Keras progress: 0 silent, 1 bar, 2 one line per epoch.")

    def __post_init__(self):
        require_finite(self)
        check_choice("mode", self.mode, MODES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("monitor", self.monitor, MONITORS)
        if not self.model_dir:
            raise ValueError("model_dir is empty; pass --model_dir=<run folder>")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.steps_per_epoch < 0 or self.val_steps < 0:
            raise ValueError("steps_per_epoch and val_steps must be >= 0 (0 = the whole split)")
        if self.mode == "distill" and not self.distill.teacher:
            raise ValueError(
                "mode 'distill' needs a teacher: pass --teacher=<teacher run folder or model.keras>"
            )
        if len(self.profile_steps) != 2 or self.profile_steps[0] > self.profile_steps[1]:
            raise ValueError(
                f"profile_steps must be (first, last) with first <= last, got {self.profile_steps}"
            )

    @property
    def view(self) -> str:
        """The input view of the trained network: "hr" for a teacher, else "lr"."""
        return "hr" if self.mode == "teacher" else "lr"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The resolved config as JSON (written to ``model_dir/config.json``)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        d = dict(d)
        data = dict(d.pop("data"))
        data["unlabeled_dirs"] = tuple(data.get("unlabeled_dirs", ()))
        net = dict(d.pop("net", {}))
        for key in ("planes", "blocks"):  # JSON lists back to (hashable) tuples
            if isinstance(net.get(key), list):
                net[key] = tuple(net[key])
        d["profile_steps"] = tuple(d.get("profile_steps", (0, 0)))
        return cls(
            data=PipelineConfig(**data),
            net=NetConfig(**net),
            distill=DistillConfig(**d.pop("distill", {})),
            optim=OptimConfig(**d.pop("optim", {})),
            stain=StainConfig(**d.pop("stain", {})),
            **d,
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def smoke(cfg: RunConfig) -> RunConfig:
    """Shrinks a config to run in seconds: tiny net, 2 epochs of 2 steps, 32 px tiles, batch 4.

    Everything else (mode, data folder, loss weights, model_dir) is kept, so a smoke run
    exercises the same code path as the full run.
    """
    hr_px = min(cfg.data.hr_px or 32, 32)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=4, hr_px=hr_px, shuffle_buffer=16),
        net=dataclasses.replace(
            cfg.net, planes=(4, 8, 8, 16) if cfg.net.arch == "resnet_gn" else cfg.net.planes
        ),
        epochs=min(cfg.epochs, 2),
        steps_per_epoch=2,
        val_steps=1,
        profile_steps=(0, 0),
    )

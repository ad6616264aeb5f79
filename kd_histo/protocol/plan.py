"""The protocol's grid: an :class:`ExperimentConfig` and the runs it names (pure; no training).

``plan(cfg)`` turns an experiment into named :class:`RunSpec` runs (no I/O beyond reading
``dataset.json``), one per row of :data:`KINDS` (the run kinds, described once: mode, view, what
each reads, its label in reports and figures) per seed, factor and unlabeled fraction: for each
seed a teacher on the HR view, and for each factor a baseline (LR view, labels), a KD student (LR
view, frozen teacher, no labels) at each extra unlabeled fraction of the pool, and optionally
(``labeled_student_ce > 0``) a student that also learns from the labels where they exist.
Where each run's folders lie (``eval_dir``, ``cascade_dir``) is defined here once, for the runner
(:mod:`kd_histo.protocol.experiment`) and the report (:mod:`kd_histo.protocol.report`) alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from kd_histo import schema
from kd_histo.data.pipeline import unlabeled_pool_size
from kd_histo.evaluation.cascade import DEFAULT_FRACTIONS
from kd_histo.numbers import require_finite
from kd_histo.settings import setting
from kd_histo.training.config import RunConfig

EXPERIMENT_JSON = "experiment.json"
STATE_JSON = "state.json"  # wall time of every finished step (kd_histo.protocol.experiment)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the protocol's grid over a run template.

    Attributes:
      out_dir: the experiment folder (see the module docstring).
      base: template of every run: data folder and pipeline, network, optimizer, epochs,
        distillation weights, precision. Its mode, model_dir, factor, teacher and unlabeled
        settings are set per run. ``base.distill.teacher_cache="auto"`` gives the students of
        each seed and factor one shared teacher cache (``runs/s<seed>/teacher_cache_x<factor>``),
        those of the seeds' ensemble one per factor (``runs/teacher_cache_ens_x<factor>``).
      factors: resolution factors of the baselines and students.
      unlabeled_fractions: fractions of the unlabeled pool (the data set's ``unlabeled`` split
        plus ``base.data.unlabeled_dirs``) added to the students' training tiles; 0 = the
        labeled train split's tiles only (their labels unused).
      seeds: one full protocol per seed.
      teacher_epochs: epochs of the teacher (0 = ``base.epochs``): a teacher is trained once and
        may get a longer schedule; baselines and students keep ``base.epochs`` (a fair pair).
      student_epochs: epochs of the students (0 = ``base.epochs``). Distillation students keep
        improving long after supervised nets stop ("patient" teachers); the report's ``train_s``
        column gives each run's wall time, so pairs can be compared at equal epochs or equal time.
      baseline_epochs: epochs of the LR baselines (0 = ``base.epochs``).
      labeled_student_ce: > 0 adds, per factor, a ``student_ce`` run: the KD student that also
        learns from the labels where they exist (cross-entropy with this weight on the labeled
        train tiles) and reads the largest unlabeled fraction; what most users with some labels
        would run. 0 = no such run.
      teachers_from: another experiment folder whose teachers (``runs/s<seed>/teacher``) this one
        uses instead of training its own: ablations that change only students or baselines then
        share the main run's teachers (paired, and a teacher's training time saved per seed). The
        runner refuses a teacher there that is missing or was trained with other settings.
      results_dir: a results folder under version control (see :mod:`kd_histo.protocol.bundle`):
        complete seeds are exported to it and, in a fresh checkout, imported from it.
      baselines: train the LR baselines.
      students, ensemble_students: train the label-free students of each seed's teacher; of the
        ensemble of every seed's teacher (``teachers_from``'s, so only these rows train).
      eval_split: the split every run is evaluated on.
      n_boot: bootstrap replicates of the 95% intervals.
      cost_batch_sizes: batch sizes of the latency measurement (the last gives the speedup).
      cost_repeats: timed repeats per batch size.
      cascade_fractions: teacher shares of the cascade measured for each factor's student (no extra
        unlabeled data) with its seed's teacher (``kd_histo.evaluation.cascade``); empty = no
        cascade.
      title: a name for the report.
    """

    # --out_dir is shared by the binaries (one default per process, ""); here it is required.
    out_dir: str = setting(
        help="Experiment folder: runs, cost, results and report.", flag_default=""
    )
    base: RunConfig
    factors: tuple[float, ...] = setting(
        (2.0, 4.0, 8.0), "Resolution factors of the baselines and students."
    )
    # The binary's "auto" is resolved against the data (kd_histo.cli.experiment).
    unlabeled_fractions: tuple[float, ...] = setting(
        (0.0,),
        "Fractions of the unlabeled pool added to the students' tiles, e.g. 0,0.25,0.5,1; "
        "auto = 0,0.25,0.5,1 when there is unlabeled data, else 0.",
        flag_default=("auto",),
    )
    seeds: tuple[int, ...] = setting((0,), "One whole protocol per seed.")
    teacher_epochs: int = setting(
        0, "Epochs of the teacher (0 = --epochs); baselines and students keep --epochs."
    )
    student_epochs: int = setting(
        0,
        "Epochs of the students (0 = --epochs): distillation students keep "
        "improving long after supervised nets stop; train_s in the report gives "
        "each run's wall time for an equal-time comparison.",
    )
    baseline_epochs: int = setting(0, "Epochs of the LR baselines (0 = --epochs).")
    labeled_student_ce: float = setting(
        0.0,
        "> 0 adds, per factor, a student that also learns from the labels where they exist "
        "(cross-entropy with this weight beside KD) and reads the largest unlabeled fraction: run "
        "student_ce_x<factor>. 0 = none.",
    )
    teachers_from: str = setting(
        "",
        "Another experiment folder whose teachers (runs/s<seed>/teacher) this one uses instead of "
        "training its own (ablations of students or baselines); they must be trained with this "
        "experiment's teacher settings. Empty = train them here.",
    )
    results_dir: str = setting(
        "",
        "A folder kept under version control (e.g. results/<name>): every complete seed's results "
        "(run records, metrics, per-tile predictions; no weights) are exported to its bundle/, and "
        "a rerun in a fresh checkout imports them instead of retraining those seeds, so an "
        "experiment longer than one machine's life resumes from a commit. The tables and the "
        "report are copied there too. Empty = off.",
    )
    baselines: bool = setting(True, "Train the LR baselines (labels, LR view).")
    students: bool = setting(
        True, "Train the label-free students of each seed's teacher (student_x<factor>)."
    )
    ensemble_students: bool = setting(
        False,
        "Also train, per seed and factor, a label-free student of the ensemble of every seed's "
        "teacher (student_ens_x<factor>, the largest unlabeled fraction); needs --teachers_from "
        "and two seeds or more.",
    )
    eval_split: str = setting("test", "Split every run is evaluated on: test or val.")
    n_boot: int = setting(1000, "Bootstrap replicates of the 95% intervals.")
    cost_batch_sizes: tuple[int, ...] = setting(
        (1, 32), "Latency batch sizes; the last gives the speedup."
    )
    cost_repeats: int = 5
    cascade_fractions: tuple[float, ...] = setting(
        DEFAULT_FRACTIONS,
        "Teacher shares of the cascade measured for each factor's student (report: "
        "cascade rows); empty = none.",
    )
    title: str = setting("kd_histo experiment", "Title of the report.")

    def __post_init__(self):
        require_finite(self)
        if not self.out_dir:
            raise ValueError("out_dir is empty; pass --out_dir=<experiment folder>")
        if not self.factors or min(self.factors) <= 1.0:
            raise ValueError(f"factors must be > 1 (the LR view is smaller), got {self.factors}")
        if not self.unlabeled_fractions or not all(
            0.0 <= f <= 1.0 for f in self.unlabeled_fractions
        ):
            raise ValueError(
                f"unlabeled_fractions must lie in [0, 1], got {self.unlabeled_fractions}"
            )
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed")
        for name in ("teacher_epochs", "student_epochs", "baseline_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = epochs), got {getattr(self, name)}")
        if self.labeled_student_ce < 0:
            raise ValueError(
                f"labeled_student_ce must be >= 0 (0 = no such run), got {self.labeled_student_ce}"
            )
        if self.eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', got {self.eval_split!r}")
        if self.base.distill.teacher_cache not in ("", "auto"):
            raise ValueError(
                "an experiment shares one teacher cache per seed and factor: give "
                f"teacher_cache 'auto' or '', not {self.base.distill.teacher_cache!r}"
            )
        if self.ensemble_students and (not self.teachers_from or len(self.seeds) < 2):
            raise ValueError(
                "ensemble_students distils from every seed's teacher, so they must all be trained "
                "first: give --teachers_from=<experiment folder> and two --seeds or more"
            )
        if not all(0.0 <= f <= 1.0 for f in self.cascade_fractions):
            raise ValueError(f"cascade_fractions must lie in [0, 1], got {self.cascade_fractions}")
        if not self.cost_batch_sizes or min(self.cost_batch_sizes) < 1:
            raise ValueError(f"cost_batch_sizes must be positive, got {self.cost_batch_sizes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunKind:
    """One kind of run of the protocol: everything the plan, the report, the claims and the
    figures know of it. :data:`KINDS` lists them; adding a kind is adding a row there.

    Attributes:
      name: the kind, and the stem of its runs' names: ``<name>_x<factor>[_unl<percent>]`` (an HR
        run is named by its kind alone, once per seed).
      mode: the :class:`RunConfig` mode it trains in: "teacher" (labels, HR view), "baseline"
        (labels, LR view) or "distill" (the seed's frozen teacher, LR view).
      view: "hr" (the converted tiles) or "lr" (each factor's downsampled tiles).
      reads: what it learns from beside its tiles: "labels", "teacher" (the seed's teacher, or its
        shared cache with ``teacher_cache=auto``). A distill run that reads labels adds
        cross-entropy with weight ``ExperimentConfig.labeled_student_ce``.
      unlabeled: the extra unlabeled fractions it runs at: "none" (its split's tiles only),
        "largest" (the largest of ``unlabeled_fractions``) or "every" (one run per fraction).
      label: its name in figure legends (" + unlabeled" is added for runs with extra data).
      epochs: the :class:`ExperimentConfig` setting of its epochs (0 there = ``base.epochs``).
      needs: the :class:`ExperimentConfig` setting that must be true (or > 0) for it to run; "" =
        always.
      cascade: its run without extra data is measured in a cascade with the seed's teacher.
      teacher: which teacher a distill kind reads: "seed" (its seed's) or "ensemble" (the
        ensemble of every seed's teacher of ``seeds``, ``kd_histo.training.ensemble``).
      note: a sentence for report.md when it runs, formatted with ``cfg`` (the experiment).
      marker, colour, size: its points in the figures (matplotlib marker, colour, marker size).
      nudge: factors on its x (GFLOPs) in accuracy vs compute, without and with extra data: runs of
        one input size share their GFLOPs, so each kind is moved sideways a little.
    """

    name: str
    mode: str
    view: str
    reads: tuple[str, ...]
    unlabeled: str
    label: str
    epochs: str
    needs: str = ""
    cascade: bool = False
    teacher: str = "seed"
    note: str = ""
    marker: str = "o"
    colour: str = "tab:blue"
    size: float = 8
    nudge: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        if self.view not in ("hr", "lr") or (self.view == "hr") != (self.mode == "teacher"):
            raise ValueError(f"run kind {self.name}: the teacher mode reads HR, every other LR")
        if (self.mode == "distill") != ("teacher" in self.reads):
            raise ValueError(f"run kind {self.name}: distill runs, and only they, read a teacher")
        if self.teacher not in ("seed", "ensemble"):  # a distill kind's; the others read none
            raise ValueError(f"run kind {self.name}: teacher {self.teacher!r}")
        if self.unlabeled not in ("none", "largest", "every") or (
            self.mode != "distill" and self.unlabeled != "none"
        ):
            raise ValueError(f"run kind {self.name}: unlabeled {self.unlabeled!r}")

    @property
    def label_free(self) -> bool:
        """A student that never sees a label (the paper's claims are about these)."""
        return self.mode == "distill" and "labels" not in self.reads

    def enabled(self, cfg: ExperimentConfig) -> bool:
        """The experiment runs this kind (its ``needs`` setting is on)."""
        return not self.needs or bool(getattr(cfg, self.needs))


# The rows' order is the report's reading order; the plan's training order follows from it (grid).
KINDS = (
    RunKind("teacher", mode="teacher", view="hr", reads=("labels",), unlabeled="none",
            label="teacher", epochs="teacher_epochs", marker="*", colour="tab:red", size=14),
    RunKind("baseline", mode="baseline", view="lr", reads=("labels",), unlabeled="none",
            label="baseline", epochs="baseline_epochs", needs="baselines", marker="s",
            colour="tab:grey", nudge=(0.94, 0.94)),
    RunKind("student", mode="distill", view="lr", reads=("teacher",), unlabeled="every",
            label="student", epochs="student_epochs", needs="students", cascade=True,
            nudge=(1.0, 1.06)),
    RunKind("student_ce", mode="distill", view="lr", reads=("teacher", "labels"),
            unlabeled="largest", label="student + labels", epochs="student_epochs",
            needs="labeled_student_ce", marker="D", colour="tab:green", size=7,
            nudge=(1.12, 1.12),
            note="Runs `student_ce_*`: the same student that also learns from the labels where "
            "they exist (cross-entropy weight {cfg.labeled_student_ce:g})."),
    RunKind("student_ens", mode="distill", view="lr", reads=("teacher",), unlabeled="largest",
            label="student of the ensemble", epochs="student_epochs", needs="ensemble_students",
            teacher="ensemble", marker="P", colour="tab:orange", size=9, nudge=(1.06, 1.18),
            note="Runs `student_ens_*`: label-free students of the ensemble of the seeds' "
            "teachers (seeds {cfg.seeds}: the mean of their probabilities at the KD temperature; "
            "feature loss {cfg.base.distill.ensemble_features})."),
)  # fmt: skip


def run_kind(name: str) -> RunKind:
    """The row of :data:`KINDS` called ``name``."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise ValueError(f"run kind {name!r} unknown; choose one of {[k.name for k in KINDS]}")


def kind_rank(name: str) -> int:
    """Where runs of kind ``name`` come in the report's reading order."""
    return [k.name for k in KINDS].index(run_kind(name).name)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the protocol."""

    name: str  # teacher, baseline_x4, student_x4, student_x4_unl50, student_ce_x4_unl100
    kind: str  # the name of one of KINDS
    factor: float  # 1.0 for the teacher
    unlabeled_fraction: float
    seed: int
    config: RunConfig

    @property
    def model_dir(self) -> str:
        return self.config.model_dir


def _fmt(factor: float) -> str:
    return f"{factor:g}"


def run_name(kind: str, factor: float = 1.0, unlabeled_fraction: float = 0.0) -> str:
    """``teacher``, ``baseline_x4``, ``student_x4``, ``student_x4_unl50`` (50% of the pool),
    ``student_ce_x4_unl100``."""
    if run_kind(kind).view == "hr":
        return kind
    name = f"{kind}_x{_fmt(factor)}"
    return f"{name}_unl{round(100 * unlabeled_fraction)}" if unlabeled_fraction > 0 else name


_POOL_ORDER = {"none": 0, "largest": 1, "every": 2}


def grid(cfg: ExperimentConfig) -> list[tuple[str, float, float]]:
    """One seed's runs as (kind, factor, unlabeled fraction), in training order: the HR run (the
    teacher), then per factor the kinds without extra data, those at the largest fraction and
    those at every fraction, largest pool first (a shared teacher cache built for it serves the
    smaller ones); :data:`KINDS`' order within each. Reads no data."""
    kinds = [k for k in KINDS if k.enabled(cfg)]
    fractions = tuple(sorted(cfg.unlabeled_fractions, reverse=True))
    at = {"none": (0.0,), "largest": fractions[:1], "every": fractions}
    runs = [(k.name, 1.0, 0.0) for k in kinds if k.view == "hr"]
    lr = sorted((k for k in kinds if k.view == "lr"), key=lambda k: _POOL_ORDER[k.unlabeled])
    for factor in cfg.factors:
        runs.extend((k.name, factor, f) for k in lr for f in at[k.unlabeled])
    return runs


def run_names(cfg: ExperimentConfig) -> list[str]:
    """The names of one seed's runs, in training order (what :func:`plan` names them)."""
    return [run_name(*run) for run in grid(cfg)]


def plan(cfg: ExperimentConfig) -> list[RunSpec]:
    """The runs of the experiment, in training order (each teacher before its students).

    Raises:
      ValueError: an unlabeled fraction > 0 with no unlabeled data, or a data set without train
        tiles.
    """
    n_train, pool = _data_sizes(cfg)
    return [
        _spec(cfg, run_kind(kind), seed, factor, fraction, n_train, pool)
        for seed in cfg.seeds
        for kind, factor, fraction in grid(cfg)
    ]


def _data_sizes(cfg: ExperimentConfig) -> tuple[int, int]:
    """Labeled train tiles and the unlabeled pool's tiles (0 when no fraction needs it)."""
    info = schema.DatasetInfo.read(cfg.base.data.data_dir)
    n_train = info.num_examples("train")
    if n_train < 1:
        raise ValueError(
            f"{cfg.base.data.data_dir} has no train tiles; the protocol needs labeled tiles"
        )
    extra = [f for f in cfg.unlabeled_fractions if f > 0]
    pool = unlabeled_pool_size(cfg.base.data) if extra else 0
    if extra and pool == 0:
        raise ValueError(
            f"unlabeled fractions {extra} need unlabeled data: {cfg.base.data.data_dir} has no "
            "'unlabeled' split and no --unlabeled_dirs were given"
        )
    return n_train, pool


def _spec(
    cfg: ExperimentConfig,
    kind: RunKind,
    seed: int,
    factor: float,
    fraction: float,
    n_train: int,
    pool: int,
) -> RunSpec:
    """One run: the experiment's template with this kind's mode, view, teacher and data."""
    name = run_name(kind.name, factor, fraction)
    root = os.path.join(cfg.out_dir, "runs", f"s{seed}")
    if fraction == 0:
        extra = {"unlabeled_ratio": 0.0, "unlabeled_fraction": 1.0, "labeled": True}
    else:
        ratio = fraction * pool / (n_train + fraction * pool)  # each tile ~once per epoch
        extra = {"unlabeled_ratio": ratio, "unlabeled_fraction": fraction, "labeled": True}
    data = dataclasses.replace(
        cfg.base.data,
        seed=seed,
        factor=factor if kind.view == "lr" else cfg.base.data.factor,
        **extra,
    )
    distill = dataclasses.replace(cfg.base.distill, teacher_cache="")  # students only
    if kind.mode == "distill":
        teacher, cache = teacher_run_dir(cfg, seed), os.path.join(root, "teacher_cache")
        if kind.teacher == "ensemble":  # one teacher for every seed: one cache, not one per seed
            teacher = ",".join(teacher_run_dir(cfg, s) for s in cfg.seeds)
            cache = os.path.join(cfg.out_dir, "runs", "teacher_cache_ens")
        cache = cfg.base.distill.teacher_cache and f"{cache}_x{_fmt(factor)}"
        distill = dataclasses.replace(distill, teacher=teacher, teacher_cache=cache)
        if "labels" in kind.reads:
            distill = dataclasses.replace(distill, ce_weight=cfg.labeled_student_ce)
    run = dataclasses.replace(
        cfg.base,
        mode=kind.mode,
        model_dir=teacher_run_dir(cfg, seed)
        if kind.mode == "teacher"
        else os.path.join(root, name),
        data=data,
        distill=distill,
        seed=seed,
        epochs=getattr(cfg, kind.epochs) or cfg.base.epochs,
    )
    return RunSpec(name, kind.name, factor, fraction, seed, run)


def teacher_run_dir(cfg: ExperimentConfig, seed: int) -> str:
    """The run folder of a seed's teacher: this experiment's, or ``teachers_from``'s."""
    return os.path.join(cfg.teachers_from or cfg.out_dir, "runs", f"s{seed}", "teacher")


def eval_dir(spec: RunSpec, split: str) -> str:
    return os.path.join(spec.model_dir, f"eval_{split}")


def cascade_dir(spec: RunSpec, split: str) -> str:
    """Where a student's cascade with its seed's teacher is measured (cascade.json ...)."""
    return os.path.join(spec.model_dir, f"cascade_{split}")


def has_cascade(cfg: ExperimentConfig, spec: RunSpec) -> bool:
    """The cascade is measured for each factor's student without extra unlabeled data (the kinds
    marked ``cascade``)."""
    return (
        bool(cfg.cascade_fractions) and run_kind(spec.kind).cascade and spec.unlabeled_fraction == 0
    )


def teacher_of(specs: Sequence[RunSpec], seed: int) -> RunSpec:
    """The teacher run of ``seed`` among ``specs``."""
    return next(s for s in specs if s.seed == seed and run_kind(s.kind).mode == "teacher")

"""Issue 30's measurements: lung nets on stain-shifted tiles and on tissue from other sites.

Per seed and per *setting* (:data:`SETTINGS`: no normalisation, Macenko or Reinhard
normalisation, or HED stain jitter in training), a teacher on the HR tiles and a label-free
student at ``student_factor`` (the data set's unlabeled split as extra tiles, no labels) are
trained with the experiment's run template, then measured (:mod:`kd_histo.protocol.domain_probes`):

- accuracy and flagged share on the test split, and on two shifted copies of it
  (``<data_dir>_nct``: Reinhard transfer to the NCT-CRC-HE tiles' colour statistics;
  ``<data_dir>_hed_strong``: :func:`kd_histo.data.shifts.hed_strong`);
- the flagged share on the NCT tiles (another organ, lab and scanner) and on the CMU slide's
  tissue tiles (skin, read at ``slide_mpp``);
- the student's inference time with and without the out-of-domain score.

Resumable: ``results.csv`` in ``results_dir`` holds every measured row; a net whose rows are all
there is neither trained nor measured again (a fresh checkout with the committed CSV skips the
finished seeds), an unfinished run resumes from its last epoch (``kd_histo.training.train``).
Redone: rows measured with an older out-of-domain score than this kd_histo's (``ood_format``,
:class:`kd_histo.protocol.domain_report.ShiftRow`), and those of the settings or nets named in
``redo``: their ``measure/<test set>`` folders are dropped and measured again (the nets are kept;
a net whose ``ood.npz`` is older is refitted first, ``kd_histo.training.domain.refit_ood``).

Layout of ``out_dir``: ``s<seed>/teacher_<setting>``, ``s<seed>/student_x8_<setting>`` (run
folders, with ``measure/<test set>/`` inside; a :data:`PATIENT` setting's teacher is its base
setting's folder, trained and measured once), ``s<seed>/teacher_cache_<setting>_x8``,
``probes/nct`` (the NCT tiles as 112 px tiles). With ``teachers_from`` the ``none`` teacher is the
main experiment's (``<teachers_from>/runs/s<seed>/teacher``, trained with the same settings:
checked, refused in one line otherwise) and ``s<seed>/teacher_none`` holds its ``measure/`` only:
nothing is written into the other experiment's run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable

from kd_histo import schema
from kd_histo.data.pipeline import unlabeled_pool_size
from kd_histo.protocol import domain_probes, domain_report
from kd_histo.protocol.domain_report import LABELED_SETS, OOD_COST, PROBES, ShiftRow
from kd_histo.settings import setting
from kd_histo.training.config import RunConfig

# setting -> (stain normalisation, augmentation preset). A teacher cache holds one output per
# tile and flip: runs with random colour augmentation distil without one.
SETTINGS = {
    "none": ("none", "flips"),
    "macenko": ("macenko", "flips"),
    "reinhard": ("reinhard", "flips"),
    "hed": ("none", "paper+hed"),
    "reinhard_hed": ("reinhard", "flips+hed_strong"),  # normalise, and learn the residual's range
    # normalise, and learn what a lab's colours leave after the LR view is normalised
    "reinhard_lab": ("reinhard", "flips+lab"),
    # both: a lab's colour statistics, and the stain ratios that a global transfer cannot move
    "reinhard_lab_hed": ("reinhard", "flips+lab+hed_strong"),
}
# setting -> (the setting whose teacher it distils, its student's epochs / the base's): a patient
# student (Beyer et al. 2022: a student that sees its teacher's own view keeps improving long
# after supervised training would stop), compared with the base setting's at 3x the epochs. It
# shares the base's teacher folder, so it takes the base's normalisation and augmentation.
PATIENT = {"reinhard_lab_hed_patient": ("reinhard_lab_hed", 3)}
SETTINGS.update({name: SETTINGS[base] for name, (base, _) in PATIENT.items()})
NORMALISED = frozenset(name for name, (method, _) in SETTINGS.items() if method != "none")


@dataclasses.dataclass(frozen=True)
class DomainShiftConfig:
    """The domain-shift measurements (``tools/domain_shift.py``).

    Attributes:
      out_dir: folder of the runs and probes.
      base: the run template (the main experiment's data, net, optimizer and epochs).
      results_dir: folder of results.csv / results.md (kept under version control).
      seeds: one teacher and student per setting and seed.
      settings: names of :data:`SETTINGS` to train.
      student_factor: the student's resolution factor.
      nct_dir: the NCT-CRC-HE tiles (the "nct" shift's colour statistics, and an OOD probe).
      slide: a whole-slide image of another organ (an OOD probe).
      slide_mpp: µm/px at which the slide is read into HR tiles (the run's data has none).
      timing_repeats: timed passes of the score's cost measurement.
      teachers_from: a main experiment's folder (``kd-histo-experiment --out_dir``) whose teacher
        of each seed is the ``none`` setting's teacher here, instead of training the same one
        again (``flags/lc25000/experiment.flags`` trains it with these flags).
      redo: settings ("macenko") or setting/net ("none/teacher", "hed/student_x8") whose rows of
        ``seeds`` are measured again even if results.csv has them (once per command: a rerun
        with the same ``redo`` redoes them again).
    """

    out_dir: str = setting(help="Folder of the runs and probes.", flag_default="")
    base: RunConfig
    results_dir: str = setting(
        "", "Folder of results.csv / results.md (committed: finished rows are not redone)."
    )
    seeds: tuple[int, ...] = setting((0,), "One teacher and student per setting and seed.")
    settings: tuple[str, ...] = setting(
        tuple(SETTINGS),
        "Training settings: none, macenko, reinhard (stain normalisation), hed (HED jitter), "
        "reinhard_hed (Reinhard normalisation + strong HED jitter), reinhard_lab (Reinhard "
        "normalisation + l-alpha-beta statistics jitter), reinhard_lab_hed (Reinhard "
        "normalisation + both jitters), reinhard_lab_hed_patient (its teacher, a student "
        "trained 3x the epochs).",
    )
    student_factor: float = setting(8.0, "Resolution factor of the label-free student.")
    nct_dir: str = setting(
        "../shared/data/nct_crc_he_samples", "NCT-CRC-HE tiles: a colour shift and an OOD probe."
    )
    slide: str = setting(
        "../shared/data/slides/CMU-1-Small-Region.svs", "A slide of another organ (OOD probe)."
    )
    slide_mpp: float = setting(1.0, "µm/px at which --slide is read into HR tiles.")
    timing_repeats: int = setting(21, "Timed passes of the out-of-domain score's cost.")
    teachers_from: str = setting(
        "",
        "A main experiment's folder (e.g. runs/lc25000) whose teachers (runs/s<seed>/teacher) are "
        "the none setting's teachers here; refused unless trained with the same settings.",
    )
    redo: tuple[str, ...] = setting(
        (),
        "Settings (macenko) or setting/net (none/teacher, hed/student_x8) whose rows of --seeds "
        "are measured again though results.csv has them (the nets are kept: delete a run folder "
        "to retrain it). Rows of an older out-of-domain score are redone without it.",
    )

    def __post_init__(self):
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(f"settings {unknown or '[]'} unknown; choose from {list(SETTINGS)}")
        for item in self.redo:
            setting_name, slash, net = item.partition("/")
            nets = ("teacher", self.student)
            if setting_name not in self.settings or (slash and net not in nets):
                raise ValueError(
                    f"redo: {item!r} is not a setting of {list(self.settings)} or "
                    f"setting/net with net teacher or {self.student}"
                )
        if not self.out_dir or not self.seeds:
            raise ValueError("domain shift: give --out_dir and at least one seed")
        if self.student_factor <= 1:
            raise ValueError(f"student_factor must be > 1, got {self.student_factor}")

    @property
    def student(self) -> str:
        return f"student_x{self.student_factor:g}"

    def redone(self, setting_name: str, net: str) -> bool:
        """Whether ``redo`` names this setting's net."""
        return setting_name in self.redo or f"{setting_name}/{net}" in self.redo


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """One net to train and measure."""

    seed: int
    setting: str
    net: str  # "teacher" or DomainShiftConfig.student
    config: RunConfig
    teacher: RunConfig | None = None  # a student's teacher
    own_dir: str = ""  # a borrowed teacher's folder here (its measure/), else its model_dir

    @property
    def model_dir(self) -> str:
        return self.config.model_dir

    @property
    def borrowed(self) -> bool:
        """Trained by another experiment (``teachers_from``): read, never written."""
        return bool(self.own_dir) and self.own_dir != self.model_dir

    @property
    def measure_dir(self) -> str:
        """Where its test sets' evaluations and predictions are kept (one folder each)."""
        return os.path.join(self.own_dir or self.model_dir, "measure")

    def test_sets(self) -> tuple[str, ...]:
        return (*LABELED_SETS, *PROBES) + ((OOD_COST,) if self.net != "teacher" else ())


def reported_settings(settings: tuple[str, ...], rows: list[ShiftRow]) -> tuple[str, ...]:
    """The settings results.md shows: this run's and those results.csv has rows of (a run of one
    setting must not drop the others' rows from the table), in :data:`SETTINGS` order."""
    have = set(settings) | {r.setting for r in rows}
    return tuple(s for s in SETTINGS if s in have) + tuple(sorted(have - set(SETTINGS)))


def plan(cfg: DomainShiftConfig) -> list[NetSpec]:
    """Per seed and setting, the teacher then its student (pure, bar reading dataset.json)."""
    n_train = schema.DatasetInfo.read(cfg.base.data.data_dir).num_examples("train")
    data = dataclasses.replace(cfg.base.data, unlabeled_dirs=())  # the CMU slide is a probe
    pool = unlabeled_pool_size(dataclasses.replace(data, unlabeled_ratio=0.0))
    specs = []
    for seed in cfg.seeds:
        root = os.path.join(cfg.out_dir, f"s{seed}")
        for name in cfg.settings:
            teacher_of, patience = PATIENT.get(name, (name, 1))
            method, augment = SETTINGS[teacher_of]
            d = dataclasses.replace(data, seed=seed, augment=augment, unlabeled_ratio=0.0)
            own = os.path.join(root, f"teacher_{teacher_of}")  # shared: trained and measured once
            if cfg.teachers_from and teacher_of == "none":
                own_or_main = os.path.join(cfg.teachers_from, "runs", f"s{seed}", "teacher")
            else:
                own_or_main = own
            teacher = dataclasses.replace(
                cfg.base,
                mode="teacher",
                model_dir=own_or_main,
                seed=seed,
                data=d,
                distill=dataclasses.replace(cfg.base.distill, teacher_cache=""),
                stain=dataclasses.replace(cfg.base.stain, method=method),
            )
            cache = cfg.base.distill.teacher_cache and augment == "flips"
            student = dataclasses.replace(
                teacher,
                mode="distill",
                epochs=cfg.base.epochs * patience,
                model_dir=os.path.join(root, f"{cfg.student}_{name}"),
                data=dataclasses.replace(
                    d, factor=cfg.student_factor, unlabeled_ratio=pool / (n_train + pool)
                ),
                distill=dataclasses.replace(
                    cfg.base.distill,
                    teacher=teacher.model_dir,
                    ce_weight=0.0,
                    teacher_cache=os.path.join(
                        root, f"teacher_cache_{name}_x{cfg.student_factor:g}"
                    )
                    if cache
                    else "",
                ),
                stain=dataclasses.replace(cfg.base.stain, method="none"),  # the teacher's, taken
            )
            specs.append(NetSpec(seed, name, "teacher", teacher, own_dir=own))
            specs.append(NetSpec(seed, name, cfg.student, student, teacher))
    return specs


def _trained(model_dir: str) -> bool:
    from kd_histo.training.run_record import RUN_JSON, read_run_record

    return os.path.isfile(os.path.join(model_dir, RUN_JSON)) and os.path.isfile(
        read_run_record(model_dir).model_path(model_dir)
    )


def _train(config: RunConfig, log: Callable[[str], None]) -> None:
    import keras

    from kd_histo.training import train

    if _trained(config.model_dir):
        return
    log(f"training {config.model_dir} ({config.mode}, {config.epochs} epochs)")
    result = train.train(config)
    if result.diverged_at_epoch is not None:
        raise RuntimeError(f"{config.model_dir} diverged in epoch {result.diverged_at_epoch}")
    keras.backend.clear_session()


def _measure(
    cfg: DomainShiftConfig, spec: NetSpec, todo: list[str], sets: dict[str, str], command: str
) -> list[ShiftRow]:
    import keras

    args = (spec.seed, spec.setting, spec.net)
    rows = []
    for test_set in todo:
        where = os.path.join(spec.measure_dir, test_set)
        if test_set in LABELED_SETS:
            row = domain_probes.measure_labeled(
                spec.model_dir, sets[test_set], test_set, *args, where
            )
        elif test_set in PROBES:
            mpp = cfg.slide_mpp if test_set == "cmu_slide" else 0.0
            row = domain_probes.measure_probe(
                spec.model_dir, sets[test_set], test_set, *args, where, mpp
            )
        else:
            row = domain_probes.measure_cost(
                spec.model_dir, sets["test"], *args, cfg.timing_repeats, command
            )
        rows.append(row)
        keras.backend.clear_session()
    return rows


def _comparable(run: RunConfig) -> dict:
    """A teacher's config less what does not change what it learns: its folder's name, the
    verbosity, and the unlabeled pool of a run that reads none."""
    d = run.to_dict()
    d.pop("model_dir", None)
    d.pop("verbose", None)
    if run.data.labeled and run.data.unlabeled_ratio == 0:
        d["data"] = {
            k: v for k, v in d["data"].items() if k not in ("unlabeled_dirs", "unlabeled_fraction")
        }
    flat = {}
    for k, v in d.items():
        for sub, w in v.items() if isinstance(v, dict) else [("", v)]:
            flat[f"{k}.{sub}" if sub else k] = json.dumps(w, sort_keys=True)
    return flat


def check_borrowed(spec: NetSpec) -> None:
    """A teacher of ``teachers_from`` must be trained, with the planned teacher's settings, and
    carry this kd_histo's out-of-domain statistics (it is not refitted: another experiment's).

    Raises:
      ValueError: one line saying which, and what to do.
    """
    from kd_histo.models import ood
    from kd_histo.training.run_record import CONFIG_JSON

    where = f"--teachers_from: {spec.model_dir}"
    if not _trained(spec.model_dir):
        raise ValueError(
            f"{where} holds no trained teacher for seed {spec.seed}; train it there first or "
            "drop --teachers_from"
        )
    with open(os.path.join(spec.model_dir, CONFIG_JSON)) as f:
        trained = _comparable(RunConfig.from_dict(json.load(f)))
    planned = _comparable(spec.config)
    differ = sorted(k for k in trained.keys() | planned.keys() if trained.get(k) != planned.get(k))
    if differ:
        raise ValueError(
            f"{where} was trained with other settings ({', '.join(differ)}) than this teacher; "
            "drop --teachers_from to train one here"
        )
    found = ood.file_format(spec.model_dir)
    current = ood.current_format(spec.setting in NORMALISED)
    if found is not None and found < current:
        raise ValueError(
            f"{where} has out-of-domain statistics of format {found} (< {current}); refit "
            f"them there (python tools/refit_ood.py --model_dir={spec.model_dir}) or drop "
            "--teachers_from"
        )


def _current_ood(spec: NetSpec, log: Callable[[str], None]) -> None:
    """A net whose ood.npz is of an older format than this kd_histo's score gets it refitted; its
    measure/ folder, made with the old one, is dropped."""
    from kd_histo.models import ood
    from kd_histo.training.domain import refit_ood

    found = ood.file_format(spec.model_dir)
    if found is None or found >= ood.current_format(spec.setting in NORMALISED):
        return
    log(f"{spec.model_dir}: out-of-domain statistics of format {found}, refitted ({ood.FORMAT})")
    shutil.rmtree(spec.measure_dir, ignore_errors=True)
    if refit_ood(spec.model_dir, log=log) is None:
        raise RuntimeError(f"{spec.model_dir}: its out-of-domain statistics could not be refitted")


def _todo(
    cfg: DomainShiftConfig, spec: NetSpec, rows: list[ShiftRow]
) -> tuple[list[str], list[str]]:
    """(test sets to measure, those among them whose rows are there but stale or redone)."""
    have = {r.key: r for r in rows}
    redo = cfg.redone(spec.setting, spec.net)
    todo, again = [], []
    for t in spec.test_sets():
        row = have.get((spec.seed, spec.setting, spec.net, t))
        if row is None or row.stale(NORMALISED) or redo:
            todo.append(t)
            if row is not None:
                again.append(t)
    return todo, again


def test_sets(cfg: DomainShiftConfig, log: Callable[[str], None]) -> dict[str, str]:
    """{test set: data folder, tile folder or slide}, the shifted copies written if missing."""
    from kd_histo.data import shifts

    data_dir = cfg.base.data.data_dir
    nct, _ = domain_probes.write_nct_probe(cfg.nct_dir, os.path.join(cfg.out_dir, "probes", "nct"))
    return {
        "test": data_dir,
        "test_nct": domain_probes.write_shifted_split(
            data_dir, shifts.nct_like(cfg.nct_dir), log=log
        ),
        "test_hed_strong": domain_probes.write_shifted_split(
            data_dir, shifts.hed_strong(), log=log
        ),
        "nct_tiles": nct,
        "cmu_slide": cfg.slide,
    }


def run(cfg: DomainShiftConfig, command: str, about: str, log: Callable[[str], None] = print):
    """Trains and measures what ``results_dir``'s results.csv lacks; rewrites it and results.md
    after every net. Returns the rows."""
    csv_path = os.path.join(cfg.results_dir or cfg.out_dir, domain_report.RESULTS_CSV)
    md_path = os.path.join(os.path.dirname(csv_path), domain_report.RESULTS_MD)
    os.makedirs(os.path.dirname(csv_path) or ".", exist_ok=True)
    rows = domain_report.read_rows(csv_path)
    specs = plan(cfg)
    borrowed = {s.model_dir for s in specs if s.borrowed}  # read, never trained or written
    for spec in specs:
        if spec.borrowed:
            check_borrowed(spec)
    sets: dict[str, str] = {}
    for spec in specs:
        todo, again = _todo(cfg, spec, rows)
        if not todo:
            log(f"s{spec.seed} {spec.setting} {spec.net}: measured already, skipped")
            continue
        sets = sets or test_sets(cfg, log)
        if spec.teacher is not None and spec.teacher.model_dir not in borrowed:
            _train(spec.teacher, log)
        if not spec.borrowed:
            _train(spec.config, log)
            _current_ood(spec, log)
        if again:
            log(f"s{spec.seed} {spec.setting} {spec.net}: measuring {', '.join(again)} again")
        for t in again:  # their evaluations and predictions would be read back
            shutil.rmtree(os.path.join(spec.measure_dir, t), ignore_errors=True)
        new = _measure(cfg, spec, todo, sets, command)
        keys = {r.key for r in new}  # rows another process wrote meanwhile are kept
        rows = [r for r in domain_report.read_rows(csv_path) if r.key not in keys] + new
        domain_report.write_rows(csv_path, rows)
        domain_report.write_markdown(
            md_path, rows, reported_settings(cfg.settings, rows), about, NORMALISED
        )
        log(f"s{spec.seed} {spec.setting} {spec.net}: " + ", ".join(_brief(r) for r in new))
    return rows


def _brief(r: ShiftRow) -> str:
    if r.test_set == OOD_COST:
        return f"{r.test_set} {r.extra_time_pct:+.1f}%"
    acc = "" if r.accuracy != r.accuracy else f"acc {100 * r.accuracy:.1f}% "
    return f"{r.test_set} {acc}flagged {100 * r.ood_flagged:.1f}% (n={r.n})"

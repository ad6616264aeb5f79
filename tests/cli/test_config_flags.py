"""Each setting is defined once: the binaries' flags are the config dataclasses' fields.

Walks every binary's flags and its config dataclasses: a flag's default is its field's default
(or the binaries' declared ``flag_default``), every field is a flag or named here as set by code,
every flag is a field or a binary's own switch; and the flags of the running LC25000 experiment
still make the RunConfig / ExperimentConfig the hand-written flag copying made (config.json and
experiment.json unchanged, so the experiment resumes).
"""

import ast
import dataclasses
import json

import pytest
from support import REPO

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import cost as cost_cli
from kd_histo.cli import demo as demo_cli
from kd_histo.cli import evaluate as evaluate_cli
from kd_histo.cli import experiment as experiment_cli
from kd_histo.cli import export as export_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli
from kd_histo.cli import train as train_cli
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.protocol.plan import ExperimentConfig
from kd_histo.training.config import DistillConfig, NetConfig, OptimConfig, RunConfig

BINARIES = [
    convert_cli,
    train_cli,
    evaluate_cli,
    cost_cli,
    predict_cli,
    experiment_cli,
    demo_cli,
    export_cli,
]

# Fields of the binaries' configs that are no flag: set by code (the protocol, the library's
# callers), with the reason. A new field must be added either as a flag or here.
NOT_FLAGS = {
    "PipelineConfig": {
        "class_balanced",
        "shuffle_buffer",
        "drop_remainder",
        "normalize",
        "unlabeled_fraction",
        "cycle_length",
        "seed",
    },  # = the run's --seed (RunConfig.seed)
    "RunConfig": {"data", "net", "distill", "optim", "stain", "image_grids"},
    "NetConfig": {"blocks", "groups", "width_scale"},
    "DistillConfig": set(),
    "OptimConfig": {"clipnorm"},
    "ExportConfig": set(),
    "StainConfig": {"reference_tiles"},
    "ExperimentConfig": {"base", "cost_repeats"},
    "EvalConfig": {"seed"},
    "CostConfig": set(),
    "PredictConfig": set(),
    "ConvertConfig": {"neardup", "encode", "command"},
    "EncodeOptions": set(),
}


def _configs():
    return {cls for b in BINARIES for cls in b.CONFIGS}


def _own(binary) -> tuple[str, ...]:
    return getattr(binary, "OWN_FLAGS", ())


def _typed(flag: fc.ConfigFlag, value):
    """An absl flag value as the config field holds it (lists of strings -> typed tuples)."""
    if flag.kind == "list" and value is not None:
        return tuple(flag.item(v) for v in value)
    return value


def _shared_names() -> set[str]:
    """Flag names of several settings (one per binary: --out_dir, --batch_size, --names...)."""
    names = [flag.name for cls in _configs() for flag in fc.config_flags(cls)] + list(fc.OWN_FLAGS)
    return {n for n in names if names.count(n) > 1}


def test_every_binary_declares_its_configs_and_own_flags():
    assert {cls.__name__ for cls in _configs()} == set(NOT_FLAGS)
    for b in BINARIES:
        assert set(_own(b)) <= set(fc.OWN_FLAGS), b.PROG


@pytest.mark.parametrize(
    "cls", sorted(_configs(), key=lambda c: c.__name__), ids=lambda c: c.__name__
)
def test_flag_defaults_are_the_config_defaults(cls):
    flags = fc.config_flags(cls)
    assert flags, cls
    for flag in flags:
        absl_flag = fc.FLAGS[flag.name]
        meta = flag.field.metadata
        want = meta.get("flag_default", flag.field.default)
        if want is dataclasses.MISSING:  # a required field: its flag has no default
            assert absl_flag.default in (None, []), flag.name
            continue
        if "flag_default" in meta and flag.kind == "list":  # e.g. --unlabeled_fractions=auto
            got, want = absl_flag.default, list(want)
        else:
            got, want = (
                _typed(flag, absl_flag.default),
                tuple(want) if flag.kind == "list" else want,
            )
        assert got == want and type(got) is type(want), (cls.__name__, flag.name, got, want)
        if flag.name not in _shared_names():  # a shared name shows the first definition's help
            assert absl_flag.help.endswith(meta["help"]), flag.name
        if "choices" in meta:
            assert sorted(absl_flag.parser.enum_values) == sorted(meta["choices"]), flag.name


@pytest.mark.parametrize(
    "cls", sorted(_configs(), key=lambda c: c.__name__), ids=lambda c: c.__name__
)
def test_every_config_field_is_a_flag_or_set_by_code(cls):
    flagged = {f.field.name for f in fc.config_flags(cls)}
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - flagged == NOT_FLAGS[cls.__name__], cls.__name__


def test_every_flag_is_a_config_field_or_a_binarys_own():
    ours = {
        f.name
        for flags in fc.FLAGS.flags_by_module_dict().values()
        for f in flags
        if any(f is g for g in fc.FLAGS.flags_by_module_dict().get(fc.__name__, []))
    }
    from_configs = {flag.name for cls in _configs() for flag in fc.config_flags(cls)}
    own = {name for b in BINARIES for name in _own(b)}
    assert ours == from_configs | own
    for name in from_configs & set(fc.OWN_FLAGS):  # one name, another binary: the same default
        assert fc.OWN_FLAGS[name][1] == fc.FLAGS[name].default, name


def test_no_binary_defines_a_flag_by_hand():
    for path in (REPO / "kd_histo" / "cli").glob("*.py"):
        calls = [
            n
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr.startswith("DEFINE_")
        ]
        assert path.name == "flags_common.py" or not calls, path.name


def _parse(prog, argv):
    fc.FLAGS.unparse_flags()
    fc.FLAGS([prog, *argv])


@pytest.fixture
def parsed():
    yield _parse
    fc.FLAGS.unparse_flags()


def test_unset_flags_make_the_config_defaults(parsed):
    parsed("kd-histo-train", ["--mode=teacher", "--data_dir=d", "--model_dir=m"])
    assert train_cli.config_from_flags() == RunConfig(
        mode="teacher",
        model_dir="m",
        data=PipelineConfig("d"),
        net=NetConfig(),
    )
    parsed(
        "kd-histo-train",
        ["--mode=teacher", "--data_dir=d", "--model_dir=m", "--arch=resnet18", "--norm=batch"],
    )
    assert train_cli.config_from_flags().net == NetConfig(arch="resnet18", norm="batch")


def test_list_enum_and_bool_flags_parse_as_before(parsed, capsys):
    parsed(
        "kd-histo-experiment",
        [
            "--data_dir=d",
            "--out_dir=o",
            "--factors=2,4",
            "--unlabeled_fractions=0,0.5",
            "--seeds=3",
            "--nobaselines",
            "--planes=8,16,32,64",
            "--cascade_fractions=",
        ],
    )
    cfg = experiment_cli.config_from_flags()
    assert cfg.factors == (2.0, 4.0) and cfg.unlabeled_fractions == (0.0, 0.5) and cfg.seeds == (3,)
    assert (
        cfg.baselines is False
        and cfg.base.net.planes == (8, 16, 32, 64)
        and cfg.cascade_fractions == ()
    )
    parsed("kd-histo-train", ["--mode=teacher", "--data_dir=d", "--model_dir=m", "--planes=8,x"])
    with pytest.raises(ValueError, match="--planes takes integers"):
        train_cli.config_from_flags()
    for argv in (["--mode=student"], ["--fit=stretch"]):  # enums: refused at parsing, one line
        assert (
            fc.invoke(
                train_cli.PROG if "mode" in argv[0] else convert_cli.PROG,
                train_cli.main if "mode" in argv[0] else convert_cli.main,
                argv,
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and argv[0].split("=")[1] in err, err


def _lc25000_expected() -> ExperimentConfig:
    """What the hand-written flag copying made of flags/lc25000/experiment.flags (with
    flags/tiles/common.flags), every field spelt out."""
    base = RunConfig(
        mode="teacher",
        model_dir="runs/lc25000",
        data=PipelineConfig(
            data_dir="shards/lc25000_true_112",
            batch_size=32,
            factor=2.0,
            hr_px=None,
            lr_method="area",
            augment="flips",
            unlabeled_ratio=0.0,
            labeled=True,
            cache=False,
            unlabeled_dirs=("shards/cmu_slide_112",),
            seed=0,
            skip_corrupt=False,
        ),
        net=NetConfig(
            arch="resnet_gn",
            planes=(16, 32, 64, 128),
            stem="small",
            norm="group",
        ),
        distill=DistillConfig(
            teacher="",
            temperature=4.0,
            kd_weight=1.0,
            feature_weight=1.0,
            feature_mode="maxpool+bicubic",
            feature_norm="l2",
            ce_weight=0.0,
            ssl_weight=0.0,
            at_weight=0.0,
            accumulation_steps=1,
            teacher_cache="auto",
        ),
        optim=OptimConfig(
            name="adam",
            learning_rate=1e-3,
            weight_decay=1e-4,
            schedule="cosine",
            decay_rate=0.9,
            warmup_epochs=0.0,
        ),
        epochs=10,
        steps_per_epoch=0,
        val_steps=0,
        precision="float32",
        strategy="default",
        seed=0,
        resume=True,
        monitor="val_accuracy",
        allow_no_val=False,
        profile_steps=(2, 4),
        verbose=2,
    )
    return ExperimentConfig(
        out_dir="runs/lc25000",
        base=base,
        factors=(2.0, 4.0, 8.0),
        unlabeled_fractions=(0.0, 0.25, 0.5, 1.0),
        results_dir="results/lc25000_3seeds",
        seeds=(0, 1, 2),
        teacher_epochs=0,
        student_epochs=0,
        baseline_epochs=0,
        labeled_student_ce=1.0,
        baselines=True,
        eval_split="test",
        n_boot=1000,
        cost_batch_sizes=(1, 32),
        cascade_fractions=(0.0, 0.05, 0.1, 0.2, 0.5),
        title="LC25000 lung (112 px tiles, real H&E)",
    )


def test_the_lc25000_experiment_flags_make_the_same_configs(parsed, monkeypatch):
    monkeypatch.chdir(REPO)
    parsed("kd-histo-experiment", ["--flagfile=flags/lc25000/experiment.flags"])
    got, want = experiment_cli.config_from_flags(), _lc25000_expected()
    assert got == want
    # experiment.json and each run's config.json: the same keys, values and JSON types (1.0, not 1)
    assert json.dumps(got.to_dict(), sort_keys=True) == json.dumps(want.to_dict(), sort_keys=True)
    assert got.base.to_json() == want.base.to_json()


def test_the_committed_run_configs_read_back():
    """Every run config committed under results/ (each run's config.json, each experiment's base)
    still reads as a RunConfig: a setting removed from the code is removed from them too."""
    paths = sorted(REPO.glob("results/*/bundle/runs/*/*/config.json"))
    assert len(paths) > 50
    for path in paths:
        RunConfig.from_dict(json.loads(path.read_text()))
    for path in sorted(REPO.glob("results/*/bundle/experiment.json")):
        RunConfig.from_dict(json.loads(path.read_text())["base"])


@pytest.mark.parametrize(
    "flagfile",
    sorted(
        p.name
        for p in (REPO / "flags" / "lc25000").glob("*.flags")
        if "--results_dir=" in p.read_text()
        and f"kd-histo-experiment --flagfile=flags/lc25000/{p.name}" in p.read_text()
    ),  # the experiment's flagfiles, each naming its own command (domain_shift.flags is
    # tools/domain_shift.py's, though its comment names kd-histo-experiment for its teachers)
)
def test_the_committed_bundles_are_the_experiments_their_flagfiles_run(
    flagfile, parsed, monkeypatch
):
    """A fresh checkout's kd-histo-experiment imports a committed bundle's seeds only when the
    bundle's experiment.json has the settings the flagfile makes now (the runner's own check), and
    each committed run trained with the experiment's network, optimizer, stain settings..."""
    from kd_histo.protocol import experiment

    monkeypatch.chdir(REPO)
    parsed("kd-histo-experiment", [f"--flagfile=flags/lc25000/{flagfile}"])
    cfg = experiment_cli.config_from_flags()
    bundle = REPO / cfg.results_dir / "bundle"
    if not bundle.is_dir():
        pytest.skip(f"{cfg.results_dir} holds no bundle")
    # the shards are not in the checkout: compare the settings, not the data set
    monkeypatch.setattr(experiment, "_data_identity", lambda path: {})
    experiment._check_same_experiment(cfg, str(bundle))
    per_run = {"mode", "model_dir", "data", "distill", "seed", "epochs", "verbose"}
    base = {k: v for k, v in json.loads(cfg.base.to_json()).items() if k not in per_run}
    runs = sorted(bundle.glob("runs/*/*/config.json"))
    assert runs
    for path in runs:  # settings added since a run trained read as their defaults (net.weights)
        run = json.loads(RunConfig.from_dict(json.loads(path.read_text())).to_json())
        assert {k: v for k, v in run.items() if k not in per_run} == base, path


def test_the_demo_trains_what_its_flagfile_says(monkeypatch):
    """kd-histo-demo reads flags/demo/common.flags, as the single kd-histo-train steps do."""
    from kd_histo.protocol import demo

    monkeypatch.chdir(REPO)
    base = train_cli.config_from_flagfile(
        demo_cli.COMMON_FLAGS, "--data_dir=out/data", "--mode=teacher", "--model_dir=out/runs"
    )
    cfg = demo.demo_config(base, "out/data")
    assert cfg == RunConfig(  # the settings kd_histo.protocol.demo held in Python before
        mode="teacher",
        model_dir="out/runs",
        data=PipelineConfig(
            data_dir="out/data", batch_size=16, augment="flips", seed=0, shuffle_buffer=1024
        ),
        net=NetConfig(arch="resnet_gn", planes=(8, 16, 32, 64), stem="small", norm="group"),
        optim=OptimConfig(name="adam", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine"),
        distill=DistillConfig(teacher_cache="auto"),
        epochs=12,
        seed=0,
        profile_steps=(2, 4),
        image_grids=True,
        verbose=2,
    )
    # a single kd-histo-train step from the demo's flagfiles trains the demo's student
    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(["kd-histo-train", "--flagfile=flags/demo/student_x4.flags"])
        student = train_cli.config_from_flags()
    finally:
        fc.FLAGS.unparse_flags()
    assert student.net == cfg.net and student.optim == cfg.optim and student.epochs == cfg.epochs
    assert student.distill == dataclasses.replace(cfg.distill, teacher=student.distill.teacher)
    with pytest.raises(FileNotFoundError):
        train_cli.config_from_flagfile("flags/demo/nosuch.flags")

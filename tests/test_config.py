"""Config composition, validation, and bad input reported as one line without a traceback."""
import json
import re

import pytest
from omegaconf import OmegaConf

from aomd.config import config_dir, validate
from aomd.errors import ConfigError
from conftest import TINY, compose, run_module

from pathlib import Path

GROUPS = {
    "dataset": {"synthetic"},
    "backbone": {"resnet18", "resnet34", "resnet50", "resnet101", "googlenet"},
    "sampler": {"distance", "semihard", "hard", "random", "all"},
    "loss": {"triplet", "triplet_l1", "contrastive", "aomd_mode1", "aomd_mode2", "sp", "at", "fitnet", "darkrank", "rkd"},
    "logger": {"wandb", "none"},
}


def test_defaults_compose_and_validate():
    cfg = validate(compose())
    assert cfg.backbone.name == "resnet18" and cfg.backbone.pretrained is False  # synthetic trains from scratch
    assert cfg.embedding_size == 128 and cfg.l2normalize is True
    assert list(cfg.eval.recall_k) == [1, 2, 4, 8]
    assert cfg.loss.triplet_ratio == 1.0 and cfg.loss.aomd_ratio == 0.0
    assert cfg.logger.mode in ("offline", "online", "disabled")
    assert cfg.teacher.backbone == "resnet18" and cfg.teacher.embedding_size == 512  # the demo's teacher
    real = validate(compose("dataset=cub200", "dataset.root=/data/cub"))
    assert real.teacher.backbone == "resnet50" and real.teacher.embedding_size == 512


# what each option sets: the loss options' non-zero ratios and settings (the reference's weights,
# README "Distillation"), the samplers' classes, the backbones' names
LOSS_OPTIONS = {
    "triplet": ({"triplet_ratio": 1.0}, {"triplet_p": 2, "margin": 0.2}),
    "triplet_l1": ({"triplet_ratio": 1.0}, {"triplet_p": 1, "margin": 0.2}),
    "contrastive": ({"contrastive_ratio": 1.0}, {"margin": 0.2}),
    "aomd_mode1": ({"aomd_ratio": 200.0}, {"mode": 1, "global_weight": 1.0, "local_weight": 1.0}),
    "aomd_mode2": ({"aomd_ratio": 200.0}, {"mode": 2, "global_weight": 1.0, "local_weight": 1.0}),
    "sp": ({"sp_ratio": 20.0}, {}),
    "at": ({"at_ratio": 1000.0}, {}),
    "fitnet": ({"fitnet_ratio": 1.0}, {}),
    "darkrank": ({"dark_ratio": 1.0}, {"dark_alpha": 2.0, "dark_beta": 3.0, "permute_len": 4}),
    "rkd": ({"dist_ratio": 1.0, "angle_ratio": 2.0}, {}),
}
SAMPLER_CLASSES = {"distance": "DistanceWeightedNegatives", "semihard": "SemiHardNegatives", "hard": "HardNegatives",
                   "random": "RandomNegatives", "all": "AllNegatives"}


@pytest.mark.parametrize("group, option", [(g, o) for g, options in GROUPS.items() for o in sorted(options)])
def test_every_group_option_composes_to_what_it_stands_for(group, option):
    from aomd.losses import TERMS

    assert {p.stem for p in (Path(config_dir()) / group).glob("*.yaml")} >= GROUPS[group]
    cfg = validate(compose(f"{group}={option}"))
    if group == "loss":
        ratios, settings = LOSS_OPTIONS[option]
        assert {t.ratio_key: cfg.loss[t.ratio_key] for t in TERMS.values() if cfg.loss[t.ratio_key]} == ratios
        assert {key: cfg.loss[key] for key in settings} == settings
        assert cfg.l2normalize is (option != "rkd")  # RKD's student is not l2-normalised
    elif group == "backbone":
        assert cfg.backbone.name == option
    elif group == "sampler":
        assert cfg.sampler._target_ == f"aomd.losses.{SAMPLER_CLASSES[option]}"
    elif group == "logger":
        assert cfg.logger.enabled is (option == "wandb")
    else:
        assert cfg.dataset._target_.endswith("load_synthetic")


def test_the_teacher_is_pretrained_as_the_student_unless_set():
    real = ("dataset=cub200", "dataset.root=/data/cub")
    assert validate(compose(*real)).teacher.pretrained is True  # the reference's ImageNet weights
    assert validate(compose(*real, "backbone.pretrained=false")).teacher.pretrained is False
    assert validate(compose(*real, "backbone.pretrained=false", "teacher.pretrained=true")).teacher.pretrained is True


def test_each_benchmark_reports_its_papers_recall_at_k():
    recall_k = lambda dataset: list(validate(compose(f"dataset={dataset}", "dataset.root=/data")).eval.recall_k)
    assert recall_k("cub200") == recall_k("cars196") == [1, 2, 4, 8]
    assert recall_k("sop") == [1, 10, 100, 1000]


def test_logger_mode_follows_wandb_mode(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    assert validate(compose()).logger.mode == "online"
    for older, current in (("dryrun", "offline"), ("run", "online")):  # W&B's older names, which it still accepts
        monkeypatch.setenv("WANDB_MODE", older)
        assert validate(compose()).logger.mode == current
    monkeypatch.delenv("WANDB_MODE")
    assert validate(compose()).logger.mode == "offline"


def test_rkd_turns_off_l2_normalisation():
    assert validate(compose("loss=rkd")).l2normalize is False


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "train.lr must be positive"),
    ("train.lr=abc", "train.lr"),
    ("train.batch_size=6", "at least 2 x train.images_per_class"),
    ("train.epochs=two", "train.epochs"),
    ("train.seed=-1", "train.seed must be between 0 and 2\\*\\*32 - 1"),
    ("train.lr_decay_epochs=[0,-5]", "train.lr_decay_epochs must list epochs numbered from 1 .*, got \\[0, -5\\]"),
    ("train.seed=4294967296", "train.seed must be between 0 and 2\\*\\*32 - 1"),
    ("eval.recall_k=[0]", "eval.recall_k"),
    ("logger.mode=sometimes", "logger.mode"),
    ("backbone.name=vgg", "backbone.name must be one of"),
    # the runtime's rules that hold on any machine: a sweep stops before its jobs queue for a card
    ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ("train.num_workers=-1", "train.num_workers must be auto or an integer of 0 or more, got -1"),
    ("train.num_workers=true", "train.num_workers must be auto or an integer of 0 or more, got True"),
    # a sampler's _target_ its keys do not fit: said now, not after the data is read
    ("sampler._target_=aomd.losses.HardNegatives", "sampler could not be built from its _target_ 'aomd.losses.HardNegatives' "
     "and its keys .*got an unexpected keyword argument 'cutoff'.*; choose a sampler option"),
])
def test_validation_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(compose(override))


@pytest.mark.parametrize("argv, message", [
    (["loss=triplet,sp"], "Ambiguous value for argument 'loss=triplet,sp': add -m to sweep over the values, or write "
                          "key=[a,b] for a list."),
    (["ablation=both"], "Could not override 'ablation'. No match in the defaults list: add the group with +ablation=<option>."),
])
def test_hydra_errors_keep_their_advice_in_one_line(argv, message):
    from aomd.config import check_before_start

    with pytest.raises(ConfigError) as error:
        check_before_start(argv)
    assert str(error.value) == message


def test_a_schedule_that_does_not_do_what_it_says_is_warned_of():
    """A shortened run keeps its dataset's decay epochs (CUB's 80-epoch schedule in 30 epochs)."""
    from aomd.config import schedule_warning
    from aomd.teachers import teacher_recipe

    cfg = validate(compose("dataset=cub200", "dataset.root=/data/cub", "train.epochs=50"))
    assert schedule_warning(cfg.train) == ("train.lr_decay_epochs [40, 60]: epoch 60 comes after the last one "
                                           "(train.epochs=50), so the learning rate does not decay there; set "
                                           "train.lr_decay_epochs for this length.")
    assert schedule_warning(validate(compose("dataset=cub200", "dataset.root=/data/cub")).train) is None
    assert schedule_warning(validate(compose("train.epochs=0")).train) is None  # evaluation only
    assert "raises the learning rate" in schedule_warning(validate(compose("train.lr_decay_gamma=2")).train)
    teacher = teacher_recipe(validate(compose("loss=sp", "teacher.train.epochs=5")))
    assert schedule_warning(teacher, "teacher.train").startswith("teacher.train.lr_decay_epochs [10]: epoch 10 comes after")


def test_a_bad_logger_mode_from_wandb_mode_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"got 'sometimes' \(from the environment variable WANDB_MODE\)\.$"):
        validate(compose())


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("overrides, fragments", [
    (["loss=foo"], ["unknown loss option 'foo'", "aomd_mode2", "triplet"]),  # before Hydra starts
    (["eval.recall_k=[1,5000]"], ["eval.recall_k", "test split has only"]),  # once the data is there
    # before the data is read: the job claims no record
    (["loss=aomd_mode2", "teacher.checkpoint=/nonexistent/teacher.pt"],
     ["teacher.checkpoint: Checkpoint /nonexistent/teacher.pt does not exist"]),
])
def test_bad_input_exits_with_one_line(tmp_path, overrides, fragments):
    result = run_module("aomd.train", "logger=none", "train.progress=false", "dataset.num_classes=24",
                        "dataset.images_per_class=8", f"hydra.run.dir={tmp_path}", *overrides)
    assert_one_line_error(result, *fragments)
    if "teacher.checkpoint" in fragments[0]:
        assert not (tmp_path / "metrics.json").exists()


def test_a_single_run_failing_after_it_claimed_its_folder_records_the_failure(tmp_path):
    """Attention Transfer between a GoogLeNet teacher and a ResNet18 student at 40 px fails when
    the objective is built, after the data is read and the job's metrics.json written: the
    record says failed, with the error, not "running" for good."""
    result = run_module("aomd.train", "logger=none", "train.progress=false", "dataset.num_classes=24",
                        "dataset.images_per_class=8", "dataset.base_size=40", "dataset.image_size=40", "loss=at",
                        "teacher.backbone=googlenet", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, "Attention Transfer compares stages 2-4 of equal spatial sizes")
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "Attention Transfer compares stages 2-4" in record["error"]


def test_a_teacher_whose_training_diverges_is_named_with_its_own_keys(tmp_path):
    """The student's error says the teacher's training failed: its "lower train.lr" is about
    teacher.train.lr."""
    result = run_module("aomd.train", *TINY, "loss=sp", "teacher.train.lr=1e12", "logger=none", f"hydra.run.dir={tmp_path}",
                        env={"AOMD_CACHE_DIR": str(tmp_path / "cache")})  # a teacher of its own, not the session's
    assert_one_line_error(result, "Training the teacher into ", "failed: The training loss became nan in epoch 1; lower "
                          "train.lr or the loss ratios (the teacher's recipe is teacher.train.*, whose null keys follow train.*).")
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("TeacherTrainingFailed: Training the teacher")


@pytest.mark.parametrize("overrides, fragments", [
    (["sampler=nearest"], ["unknown sampler option", "semihard"]),
    (["train.lrr=1"], ["`train.lrr` is not a key of this configuration; did you mean `train.lr`? (`--cfg job` shows every key)"]),
    (["datset.root=/data"], ["`datset` is not a key of this configuration; did you mean `dataset`?"]),
    (["train.zzz=1"], ["`train.zzz` is not a key of this configuration; check its spelling"]),
    (["train.lr=-0.1"], ["train.lr must be positive"]),
    (["train.lr=fast"], ["train.lr"]),
    (["train.batch_size=8", "train.images_per_class=5"], ["train.batch_size (8)"]),
    (["loss=aomd_mode2", "loss.mode=3"], ["mode must be 1"]),
    (["teacher=null"], ["a group can be set to another option, not to null"]),
    (["train.device=cuda:x"], ["cuda:<index>", "'cuda:x'"]),
    (["loss=sp", "teacher.loss=triplet_l1"], ["teacher.loss holds the settings of the teacher's own loss"]),
    (["loss=sp", "teacher.loss.margin=-1"], ["teacher.loss.margin must be 0 or more"]),
    (["loss=sp", "teacher.loss.sp_ratio=1"], ["teacher.loss cannot distil (teacher.loss.sp_ratio)"]),
    (["loss=sp", "teacher.train.epochs=0"], ["teacher.train.epochs must be at least 1"]),
    (["sampler.cutoff=2"], ["sampler.cutoff must be 0 or more and below sampler.nonzero_loss_cutoff"]),
    (["loss=darkrank", "loss.dark_beta=0"], ["loss.dark_beta must be positive"]),
    (["logger.init_timeout=-1"], ["logger.init_timeout must be 0 or more"]),
    # a sweep stops before its first job when every job breaks a rule (a value they all share)
    (["-m", "train.seed=0,1", "train.lr=-1"], ["train.lr must be positive"]),
    # Hydra passes over a search-path entry it cannot use, and the options in it read as unknown
    (["hydra.searchpath=[file:///nonexistent/my_conf]", "dataset=mydata"],
     ["hydra.searchpath folder /nonexistent/my_conf does not exist"]),
    (["hydra.searchpath=[/home/me/my_conf]", "dataset=mydata"],
     ["hydra.searchpath entry '/home/me/my_conf' needs a scheme: file:///home/me/my_conf for a folder"]),
    # a job folder named by its overrides must fit the file system (Hydra: a traceback at mkdir)
    (["-m", "hydra.sweep.subdir=${hydra.job.override_dirname}", "train.seed=0,1",
      *[f"loss.{key}=0.123456789" for key in ("margin", "global_weight", "local_weight", "sp_ratio", "at_ratio",
                                             "dark_alpha", "dark_beta", "dist_ratio", "angle_ratio", "triplet_ratio")]],
     ["hydra.sweep.subdir names job 0's folder with 292 characters (loss.angle_ratio=0.123456789,loss.at_rat",
      "more than a file system allows (255)"]),
])
def test_bad_input_stops_before_hydra_starts_with_one_line(overrides, fragments, capsys):
    from aomd.cli import start

    with pytest.raises(SystemExit) as stop:
        start(["logger=none", *overrides], "train", "aomd.train")
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(fragment in lines[0] for fragment in fragments), lines


def test_a_sweep_whose_jobs_break_rules_of_their_own_starts_and_leaves_them_to_each_job():
    from aomd.cli import start

    start(["-m", "train.lr=-1,1e-3", "logger=none"], "train", "aomd.train")  # one job can run: no stop
    # values only the job can resolve (Hydra's own, the job's environment) are the job's to check
    start(["-m", "train.lr=1e-4,2e-4", "logger=wandb", "logger.group=${hydra:job.name}"], "train", "aomd.train")
    start(["-m", "train.lr=1e-4,2e-4", "logger=none", "hydra.sweep.subdir=${hydra.job.override_dirname}"], "train", "aomd.train")
    # a single run does not use hydra.sweep.subdir, however long the folder name it would give
    start(["logger=none", "hydra.sweep.subdir=${hydra.job.override_dirname}",
           *[f"loss.{key}=0.123456789" for key in ("margin", "global_weight", "local_weight", "sp_ratio", "at_ratio",
                                                  "dark_alpha", "dark_beta", "dist_ratio", "angle_ratio")]], "train", "aomd.train")


@pytest.mark.parametrize("module, first_line", [
    ("aomd.train", "aomd.train: train an embedding network"),
    ("aomd.evaluate", "aomd.evaluate: Recall@K, MAP@R and R-Precision of a saved checkpoint"),
])
def test_help_says_what_the_entrypoint_does_and_what_the_schema_groups_are(module, first_line):
    result = run_module(module, "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(first_line), lines[:3]
    assert "loss: aomd_mode1, aomd_mode2," in result.stdout  # the groups, as Hydra lists them
    assert "The schema/* groups are the types every option is checked against" in result.stdout
    if module == "aomd.evaluate":  # the keys it says apply exist, and none of them belongs to the training alone
        applies = result.stdout.split("What applies here:")[1].split("The network is read")[0]
        keys = re.findall(r"\b(?:eval|train)\.\w+", applies)
        assert len(keys) == 9, keys
        cfg = compose("checkpoint=x.pt", config_name="evaluate")
        absent = object()
        assert all(OmegaConf.select(cfg, key, default=absent) is not absent for key in keys), keys
        assert not {"train.lr", "train.epochs", "train.compile", "eval.select"} & set(keys)
    if module == "aomd.train":  # its example commands compose and pass the checks before a job starts
        from aomd.config import check_before_start

        examples = [line.split(":", 1)[1].split("(")[0].split() for line in lines if line.strip().startswith(("one job:", "a sweep:"))]
        assert len(examples) == 2
        for example in examples:
            assert example[:3] == ["python", "-m", "aomd.train"]
            check_before_start(example[3:], "train")


def test_the_check_before_start_expands_a_preset_as_hydra_does():
    """The command line replaces a preset's param of the same key, as Hydra's BasicSweeper does."""
    from aomd.config import job_overrides

    assert job_overrides(["-m", "preset=aomd_ablation", "+ablation=both"], "train") == [
        ["loss.mode=1", "+ablation=both", "preset=aomd_ablation"], ["loss.mode=2", "+ablation=both", "preset=aomd_ablation"]]
    assert len(job_overrides(["-m", "preset=aomd_grid"], "train")) == 10
    assert len(job_overrides(["-m", "preset=aomd_grid", "loss.mode=1"], "train")) == 5
    assert job_overrides(["-m", "loss=sp,rkd", "train.seed=0,1"], "train") == [
        ["loss=sp", "train.seed=0"], ["loss=sp", "train.seed=1"], ["loss=rkd", "train.seed=0"], ["loss=rkd", "train.seed=1"]]
    # Hydra's other spelling of -m
    assert len(job_overrides(["hydra.mode=MULTIRUN", "loss=sp,rkd"], "train")) == 2
    # swept presets: Hydra would run each one's fixed settings once, neither's sweep
    with pytest.raises(ConfigError, match=r"^preset=baselines,seeds runs one job per preset with its fixed settings "
                                          r"only, not the presets' sweeps; run one preset per command"):
        job_overrides(["-m", "preset=baselines,seeds"], "train")


@pytest.mark.slow
def test_evaluate_bad_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_module("aomd.evaluate", f"checkpoint={tmp_path}/none.pt", f"hydra.run.dir={tmp_path}"),
                          "does not exist")
    assert_one_line_error(run_module("aomd.evaluate", f"hydra.run.dir={tmp_path}"), "checkpoint", "no value")


@pytest.mark.parametrize("overrides, message", [
    (["loss=aomd_mode2", "loss.global_weight=0", "loss.local_weight=0"], "both 0"),
    (["+teacher.train.epoch=3"], "teacher.train.epoch"),
    (["loss=sp", "teacher.train.lr=-1"], r"teacher.train.lr must be positive, got -1(\.0)?\.$"),  # set: no note
    # a key the teacher recipe inherits from train is named as the teacher's, and where it came from
    (["loss=sp", "train.batch_size=8", "teacher.train.images_per_class=5"],
     r"teacher.train.batch_size \(8\) must be at least 2 x teacher.train.images_per_class \(10\) so that every batch "
     r"holds negatives \(the keys teacher.train leaves null take train's values\).$"),
    (["loss=darkrank", "loss.permute_len=200"], "loss.permute_len"),
    (["loss.triplet_ratio=0"], "nothing to train"),
    (["loss.sp_ratio=-1"], "loss.sp_ratio must be 0 or more"),
])
def test_loss_and_teacher_recipe_are_checked_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(*overrides))


def test_the_teacher_recipe_is_checked_only_where_a_teacher_is_trained():
    for overrides in (["teacher.train.lr=-1"], ["loss=sp", "teacher.checkpoint=/teachers/best.pt", "teacher.train.lr=-1"]):
        assert validate(compose(*overrides)).teacher.train.lr == -1  # triplet has no teacher; a given one is not trained


def test_teacher_identity_follows_the_recipe_not_the_logging(tmp_path):
    from aomd.teachers import default_teacher_dir

    base = validate(compose())
    assert default_teacher_dir(base) == default_teacher_dir(validate(compose("train.progress=false", "train.num_workers=2")))
    assert default_teacher_dir(base) != default_teacher_dir(validate(compose("teacher.train.epochs=7")))
    assert default_teacher_dir(base) != default_teacher_dir(validate(compose("dataset.seed=3")))
    # the student's seed does not choose the teacher: a sweep over seeds shares one
    assert default_teacher_dir(base) == default_teacher_dir(validate(compose("train.seed=5")))


@pytest.mark.parametrize("overrides, message", [
    # one class a side (a dataset of one's own with a single class folder): said before the batch size
    (["dataset.num_classes=2", "dataset.images_per_class=40"], "train split has 40 images of 1 class; training needs at least 2"),
    (["dataset.num_classes=4", "dataset.images_per_class=8"], r"train.batch_size \(64\) is larger than the synthetic train split \(16 images\)"),
])
def test_the_data_is_checked_against_the_recipe_before_training(tmp_path, overrides, message):
    from aomd.build import load_data

    cfg = validate(compose("dataset.base_size=36", "dataset.image_size=32", f"dataset.cache_dir={tmp_path}", *overrides))
    with pytest.raises(ConfigError, match=message):
        load_data(cfg.dataset, cfg.train.batch_size, cfg.eval)


@pytest.mark.parametrize("dataset", ["cars196", "cub200", "sop", "folder"])
def test_a_dataset_without_its_root_names_the_key_with_an_example_of_that_dataset(dataset):
    with pytest.raises(ConfigError, match=rf"^dataset.root is not set: pass the folder that holds the dataset, "
                                          rf"e.g. dataset.root=/data/{dataset} \(the layouts"):
        validate(compose(f"dataset={dataset}"))

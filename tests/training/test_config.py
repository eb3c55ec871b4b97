"""training/config.py and the run options built on it: YAML recipes, --init-from and --extend-epochs.

Tiny runs as in test_training_pretrain.py: resnet10t at 32 px on 16 generated images, batch 8, so
2 steps per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import training.pretrain as pretrain
from tests.support.paths import REPO_ROOT
from training import loop
from training.config import TrainConfig, parse_args
from training.metrics import read_metrics
from training.model import build_mec_model

CONFIGS = REPO_ROOT / "training" / "configs"
STEPS_PER_EPOCH = 2


def arguments(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(images), "--output-dir", str(out),
        "--arch", "resnet10t", "--image-size", "32", "--dim", "32", "--hidden-dim", "64", "--pred-dim", "16",
        "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--lamda-warmup-epochs", "1", "--eps2", "64",
        "--num-workers", "0", "--log-every", "1", "--device", "cpu", "--no-tensorboard", "--snapshot-every", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory) -> Path:
    """A finished run of 2 epochs (4 steps), with its export."""
    out = tmp_path_factory.mktemp("finished")
    assert pretrain.main(arguments(images, out)) == 0
    return out


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def config_error(argv: list[str], capsys) -> str:
    """The stderr of a command that must stop with exit 2 and one line, no traceback."""
    with pytest.raises(SystemExit) as exited:
        pretrain.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------
# the config file


def test_a_config_file_with_overrides_resolves_like_the_same_options_on_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "arch: resnet18\n"
        "model_args: {channels: [32, 64, 128, 224], drop_path_rate: 0.1}\n"
        "image_size: 48\n"
        "epochs: 7\n"
        "lr: 0.25\n"
        "weight_decay: 1e-4  # PyYAML reads this one as a string\n"
        "order: exact\n"
        "eps2: scaled\n"
        "hidden_dim: null\n"
        "tensorboard: false\n"
        "channels_last: true\n"
        "knn_train: some/folder\n"
        "knn_val: other/folder\n"
    )
    overrides = ["--lr", "0.3", "--wd", "2e-5", "--no-channels-last", "--order", "6", "--data", "imgs"]
    from_file = parse_args(["--config", str(recipe), "--output-dir", "o", *overrides])
    on_command_line = parse_args(
        [
            "--output-dir", "o", "--arch", "resnet18",
            "--model-args", '{"channels": [32, 64, 128, 224], "drop_path_rate": 0.1}',
            "--image-size", "48", "--epochs", "7", "--lr", "0.25", "--weight-decay", "1e-4", "--order", "exact",
            "--eps2", "scaled", "--no-tensorboard", "--channels-last",
            "--knn-train", "some/folder", "--knn-val", "other/folder", *overrides,
        ]
    )  # fmt: skip
    assert from_file == on_command_line
    assert from_file.check() == on_command_line.check()
    # Each value came from where it should: the override, else the file, else the default.
    assert (from_file.lr, from_file.weight_decay, from_file.order, from_file.channels_last) == (0.3, 2e-5, 6, False)
    assert (from_file.epochs, from_file.image_size, from_file.tensorboard) == (7, 48, False)
    assert from_file.model_args == {"channels": [32, 64, 128, 224], "drop_path_rate": 0.1}
    assert from_file.knn_train == Path("some/folder") and from_file.data == Path("imgs")
    assert from_file.batch_size == 1024 and from_file.momentum == 0.9 and from_file.seed == 0
    assert from_file.check().eps2 == 64.0  # scaled to the paper's batch: the paper's value


def test_the_recipe_keys_and_the_options_come_from_the_dataclass():
    parser = pretrain.build_parser()
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}
    # --wd, the authors' spelling, is a hidden alias of --weight-decay (tests/cli/test_vocabulary.py).
    assert "--wd" not in parser.format_help() and "--weight-decay" in parser.format_help()
    defaults = TrainConfig(data=Path("d"), output_dir=Path("o"))  # the paper's recipe
    paper = (defaults.arch, defaults.epochs, defaults.batch_size, defaults.lr, defaults.weight_decay, defaults.order)
    assert paper == ("resnet50", 100, 1024, 0.5, 1e-5, 4)
    assert (defaults.teacher_momentum, defaults.warmup_epochs) == (0.996, 10)
    # eps^2 is the authors' 64 at every batch size (their main_pretrain.py: --eps 64, lamda = d / (m * eps)).
    for batch in (4096, 1024, 256, 65):
        assert dataclasses.replace(defaults, batch_size=batch).check(world_size=1).eps2 == 64.0
    assert dataclasses.replace(defaults, batch_size=256, eps2="scaled").check().eps2 == 64.0 * 1024 / 256


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lrr: 0.1\n", "recipe.yaml: unknown key 'lrr' (did you mean 'lr'?)"),
        ("batch-size: 64\n", "recipe.yaml: unknown key 'batch-size' (did you mean 'batch_size'?)"),
        ("epochs: ten\n", "recipe.yaml: epochs: expected an integer, got 'ten'"),
        ("epochs: 2.5\n", "recipe.yaml: epochs: expected an integer, got 2.5"),
        ("epochs: true\n", "recipe.yaml: epochs: expected an integer, got True"),
        ("lr: fast\n", "recipe.yaml: lr: expected a number, got 'fast'"),
        ("optimizer: adam\n", "recipe.yaml: optimizer: expected one of sgd, lars, got 'adam'"),
        ("tensorboard: maybe\n", "recipe.yaml: tensorboard: expected true or false, got 'maybe'"),
        ("model_args: [1, 2]\n", "recipe.yaml: model_args: expected a mapping, got [1, 2]"),
        ("order: [4]\n", "recipe.yaml: order: expected an integer >= 1 or 'exact', got [4]"),
        ("eps2: big\n", "recipe.yaml: eps2: expected a number or 'scaled', got 'big'"),
        ("eps2: auto\n", "recipe.yaml: eps2: 'auto' is no more: it meant 64 x 1024 / batch below a batch of 1024"),
        ("data: 3\n", "recipe.yaml: data: expected a path or null, got 3"),
        ("- lr\n- 0.1\n", "recipe.yaml: expected a mapping of option names to values, got list"),
        ("lr: [\n", "recipe.yaml: not valid YAML"),
        ("order: 0\n", "--order must be >= 1, or 'exact'"),
    ],
)
def test_unknown_keys_and_wrong_types_are_one_line_errors_naming_the_key(tmp_path, capsys, text, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    line = config_error(["--config", str(recipe), "--data", "d", "--output-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("training/pretrain.py: error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_a_missing_pyyaml_is_a_clear_error(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 0.1\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    line = config_error(["--config", str(recipe), "--data", "d", "--output-dir", "o"], capsys)
    assert "needs PyYAML, which is not installed: pip install 'mec-hub[train]'" in line


def test_the_run_writes_its_resolved_options_and_config_yaml_reads_back(finished, images):
    written = finished / "config.yaml"
    text = written.read_text()
    assert text.startswith("# training/pretrain.py options of the run in")
    assert "Written at step 0 of 4 by: training/pretrain.py --data" in text
    values = yaml.safe_load(text)  # read by PyYAML itself, not by the code under test
    assert values["eps2"] == 64.0 and values["hidden_dim"] == 64 and values["arch"] == "resnet10t"
    assert values["data"] == str(images) and values["tensorboard"] is False and values["order"] == 4
    assert values["weight_decay"] == 1e-5 and isinstance(values["weight_decay"], float)
    again = parse_args(["--config", str(written)]).check()
    on_command_line = parse_args(arguments(images, finished)).check()
    assert again == on_command_line  # hidden_dim was given, so nothing else was resolved
    assert not (finished / "config.json").exists()


def test_the_shipped_recipes_load_and_the_bundled_one_is_the_command_that_was_run():
    for path in sorted(CONFIGS.glob("*.yaml")):
        parse_args(["--config", str(path), "--data", "d", "--output-dir", "o"]).check()
    paper = parse_args(["--config", str(CONFIGS / "mec_resnet50_in1k.yaml")])
    assert paper == TrainConfig()  # the paper's recipe is the defaults
    assert (
        parse_args(["--config", str(CONFIGS / "mec_resnet50_in1k.yaml"), "--data", "d", "--output-dir", "o"])
        .check()
        .eps2
        == 64
    )
    script = (REPO_ROOT / "benchmarks" / "bundled_model" / "command.sh").read_text()
    as_run = re.search(r"# As run:\n((?:#.*\n)+)", script).group(1)
    as_run = " ".join(line.lstrip("# ").rstrip("\\ ") for line in as_run.splitlines())
    now = script[script.index("python training/pretrain.py --config") :]
    old_args = shlex.split(as_run)[2:]
    new_args = shlex.split(now.replace("\\\n", " "))[2:]
    assert parse_args(old_args) == parse_args(new_args)


def test_the_readme_smoke_run_uses_the_smoke_recipe_on_images_in_the_repository():
    readme = (REPO_ROOT / "README.md").read_text()
    command = re.search(
        r"\n    (python training/pretrain.py --config training/configs/cpu_smoke.yaml[^\n]*\\\n[^\n]*)", readme
    )
    args = parse_args(shlex.split(command.group(1).replace("\\\n", " "))[2:]).check()
    assert args.data == Path("examples/images")
    images = [p for p in (REPO_ROOT / args.data).iterdir() if p.suffix in (".png", ".jpg")]
    assert len(images) >= args.batch_size  # one full batch: the sampler drops a partial one
    assert (
        "examples/images"
        in subprocess.run(
            ["git", "ls-files", "examples/images"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout
    )  # tracked: a fresh clone has them


def test_the_cpu_smoke_recipe_keeps_the_series_convergent():
    smoke = parse_args(["--config", str(CONFIGS / "cpu_smoke.yaml"), "--data", "d", "--output-dir", "o"]).check()
    # ||C|| = lamda ||z1 z2^T|| <= lamda ||z1||_F ||z2||_F = lamda * m for unit-norm rows, whatever the
    # embeddings; the lamda warm-up only makes lamda smaller.
    lamda = smoke.dim / (smoke.batch_size * smoke.eps2)
    assert lamda * smoke.batch_size <= 1 / 8


# --------------------------------------------------------------------------------------------
# --init-from


def first_step_model(monkeypatch) -> dict:
    """Patch the training step to record the model's state as the first step receives it."""
    seen: dict = {}
    real_step = loop.train_step

    def recording_step(model, *args, **kwargs):
        if not seen:
            seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    return seen


def part(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_init_from_an_export_starts_student_and_teacher_from_its_weights(finished, images, tmp_path, monkeypatch):
    seen = first_step_model(monkeypatch)
    export = finished / "export"
    assert pretrain.main(arguments(images, tmp_path, "--init-from", str(export), "--max-steps", "1")) == 0
    backbone, projector = load_file(export / "model.safetensors"), load_file(export / "projector.safetensors")
    for encoder in ("student", "teacher"):
        assert_same_tensors(part(seen, f"{encoder}.backbone."), backbone)
        assert_same_tensors(part(seen, f"{encoder}.projector."), projector)
    recorded = checkpoint(tmp_path)["config"]["init_from"]
    assert recorded["weights"] == str(export) and "student backbone and projector" in recorded["source"]
    assert f"# Started from: {export}" in (tmp_path / "config.yaml").read_text()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["init_from"] == str(export)


def test_init_from_a_training_checkpoint_takes_its_student(finished, images, tmp_path, monkeypatch):
    seen = first_step_model(monkeypatch)
    source = checkpoint(finished)["model"]
    assert not torch.equal(source["student.backbone.conv1.0.weight"], source["teacher.backbone.conv1.0.weight"])
    path = finished / "checkpoint_last.pt"
    assert pretrain.main(arguments(images, tmp_path, "--init-from", str(path), "--max-steps", "1")) == 0
    for encoder in ("student", "teacher"):  # the teacher starts as a copy of the student, not of the teacher
        assert_same_tensors(part(seen, f"{encoder}.backbone."), part(source, "student.backbone."))
        assert_same_tensors(part(seen, f"{encoder}.projector."), part(source, "student.projector."))
    assert "training checkpoint at step 4" in checkpoint(tmp_path)["config"]["init_from"]["source"]


def test_init_from_is_read_at_the_start_only(finished, images, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    export = finished / "export"
    assert pretrain.main(arguments(images, out, "--init-from", str(export))) == 0
    assert "--init-from" in capsys.readouterr().out and checkpoint(out)["config"]["init_from"] is None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--arch", "resnet18"],
            "holds a resnet10t (default stem), but this run builds a resnet18 (default stem): pass --arch resnet10t",
        ),
        (
            ["--model-args", '{"stem_width": 16}'],
            'but this run builds a resnet10t (default stem, model_args {"stem_width": 16})',
        ),
        (["--dim", "48"], "do not fit the projector of this run (--dim 48, --hidden-dim 64)"),
    ],
)
def test_init_from_weights_of_another_architecture_is_a_clear_error(
    finished, images, tmp_path, capsys, extra, expected
):
    assert pretrain.main(arguments(images, tmp_path, "--init-from", str(finished / "export"), *extra)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "checkpoint_last.pt").exists()


# --------------------------------------------------------------------------------------------
# --extend-epochs


def trainable_names() -> list[str]:
    """The optimizer's parameters, in its order (every parameter that requires a gradient)."""
    model = build_mec_model("resnet10t", dim=32, hidden_dim=64, pred_dim=16)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_extend_epochs_continues_a_finished_run_with_the_longer_schedule(finished, images, tmp_path, capsys):
    out = tmp_path / "extended"
    shutil.copytree(finished, out)
    before = checkpoint(finished)
    assert before["step"] == 2 * STEPS_PER_EPOCH

    assert pretrain.main(arguments(images, out, "--extend-epochs", "3", "--max-steps", "5")) == 0
    after = checkpoint(out)
    assert after["step"] == 5 and after["total_steps"] == 3 * STEPS_PER_EPOCH
    assert after["config"]["schedule_restarts"] == [{"step": 4, "from_epochs": 2, "to_epochs": 3}]
    printed = capsys.readouterr().out
    assert "schedule extended from 2 to 3 epochs at step 4: lr" in printed

    # The lr of step 4 (the first new one) in closed form: warm-up w = 1 epoch, then a half cosine
    # from the peak 0.5 * 8 / 256 to 0 over the 3-epoch run's remaining T - w steps.
    peak, w, total = 0.5 * 8 / 256, 1 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH
    lr = peak * 0.5 * (1 + math.cos(math.pi * (4 - w) / (total - w)))
    assert lr == pytest.approx(peak / 2, rel=1e-12)
    momentum = 1 - (1 - 0.996) * 0.5 * (1 + math.cos(math.pi * 4 / total))
    record = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"][-1]
    assert record["step"] == 5
    assert record["lr"] == pytest.approx(lr, rel=1e-12)
    assert record["teacher_momentum"] == pytest.approx(momentum, rel=1e-12)
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr, rel=1e-12)

    # It continued from step 4's state: SGD's update p5 = p4 - lr * buf5 holds with the finished
    # run's weights as p4 and the closed-form lr.
    names = trainable_names()
    for index in (0, len(names) // 2, len(names) - 1):
        name = names[index]
        buf = after["optimizer"]["state"][index]["momentum_buffer"]
        expected = before["model"][name] - lr * buf
        torch.testing.assert_close(after["model"][name], expected, rtol=1e-5, atol=1e-7)
        assert not torch.equal(after["model"][name], before["model"][name])

    # The first four steps' lines are the finished run's; the schedule and its rule are recorded.
    old = [r for r in read_metrics(finished / "metrics.jsonl") if r["kind"] == "step"]
    new = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in new] == [1, 2, 3, 4, 5] and new[:4] == old
    header = (out / "config.yaml").read_text()
    assert "# Schedule extended from 2 to 3 epochs at step 4: from the restart step on" in header
    assert yaml.safe_load(header)["extend_epochs"] == 3 and yaml.safe_load(header)["epochs"] == 2

    # Rerunning the same command resumes the extended run (no second restart) to its end.
    assert pretrain.main(arguments(images, out, "--extend-epochs", "3")) == 0
    done = checkpoint(out)
    assert done["step"] == 6 and len(done["config"]["schedule_restarts"]) == 1
    assert done["export"]["meta"]["epochs"] == 3 and "extended from 2 to 3" in done["export"]["meta"]["schedule"]


def test_extend_epochs_trains_the_added_epochs_at_the_lr_of_the_longer_schedule(
    finished, images, tmp_path, monkeypatch
):
    """Every added step's lr (as the optimizer used it) and teacher momentum, against the closed forms of a
    4-epoch run: the 1-epoch warm-up once, at the start, then the half cosine over the new total."""
    out = tmp_path / "extended"
    shutil.copytree(finished, out)
    used: list[tuple[float, float]] = []
    real_step = loop.train_step

    def recording_step(model, update_teacher, criterion, optimizer, views, values, *args, **kwargs):
        result = real_step(model, update_teacher, criterion, optimizer, views, values, *args, **kwargs)
        used.append((optimizer.param_groups[0]["lr"], values.teacher_momentum))
        return result

    monkeypatch.setattr(loop, "train_step", recording_step)
    assert pretrain.main(arguments(images, out, "--extend-epochs", "4")) == 0

    peak, warmup, total = 0.5 * 8 / 256, 1 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH  # --lr 0.5 at batch 8
    added = range(2 * STEPS_PER_EPOCH, total)  # the finished run's 4 steps, then 4 new ones
    expected_lr = [peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in added]
    expected_momentum = [1 - (1 - 0.996) * 0.5 * (1 + math.cos(math.pi * s / total)) for s in added]
    assert [lr for lr, _ in used] == pytest.approx(expected_lr, rel=1e-12, abs=0)
    assert [m for _, m in used] == pytest.approx(expected_momentum, rel=1e-12, abs=0)
    assert expected_lr[0] == pytest.approx(peak * 0.75, rel=1e-12)  # not 0: no second warm-up
    logged = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"}
    assert [logged[s + 1] for s in added] == pytest.approx(expected_lr, rel=1e-12, abs=0)


def test_a_changed_schedule_without_extend_epochs_is_refused_with_the_way_to_extend(finished, images, capsys):
    assert pretrain.main(arguments(images, finished, "--epochs", "3")) == 1
    err = capsys.readouterr().err
    assert (
        "--epochs: checkpoint 2, command 3 (to make this run longer, keep --epochs 2 and add --extend-epochs 3)" in err
    )


def test_an_extended_run_is_not_resumed_with_its_old_length(finished, images, tmp_path, capsys):
    out = tmp_path / "extended"
    shutil.copytree(finished, out)
    state = checkpoint(finished)
    state["config"] = {**state["config"], "extend_epochs": 3}
    torch.save(state, out / "checkpoint_last.pt")
    assert pretrain.main(arguments(images, out)) == 1
    assert "--extend-epochs: checkpoint 3, command None" in capsys.readouterr().err


def test_extend_epochs_needs_a_run_to_extend_and_more_epochs(images, tmp_path, capsys):
    assert pretrain.main(arguments(images, tmp_path, "--extend-epochs", "3")) == 1
    assert "--extend-epochs continues the run in" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint_last.pt").exists()
    line = config_error(arguments(images, tmp_path, "--extend-epochs", "2"), capsys)
    assert "--extend-epochs 2 must be more than --epochs 2" in line


def test_config_yaml_round_trips_through_json_types():
    """What config.yaml writes is plain data: Paths as strings, order 'exact' as a word."""
    config = parse_args(["--data", "d", "--output-dir", "o", "--order", "exact", "--model-args", '{"a": [1, 2.5]}'])
    mapping = config.to_mapping()
    assert json.loads(json.dumps(mapping)) == mapping
    assert mapping["order"] == "exact" and mapping["data"] == "d" and mapping["model_args"] == {"a": [1, 2.5]}
    assert TrainConfig.from_mapping(yaml.safe_load(config.to_yaml())) == config


def test_paths_in_a_file_expand_the_home_folder_as_a_shell_does():
    config = TrainConfig.from_mapping(yaml.safe_load("data: ~/images\nknn_val: rel/val\n"), source="f.yaml")
    assert config.data == Path.home() / "images" and config.knn_val == Path("rel/val")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda path: os.mkfifo(path), "not a regular file: a named pipe (FIFO)"),
        (lambda path: path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n"), "not valid YAML (nested too deeply)"),
        (lambda path: path.write_bytes(b"lr: 0.1\n" + b"#" * (2 << 20)), "over the limit of"),
        (lambda path: path.write_bytes(b"lr: \xff\xfe\n"), "not UTF-8 text"),
    ],
    ids=["fifo", "deep", "huge", "not-utf8"],
)
def test_a_hostile_config_file_is_one_line_not_a_hang_or_a_traceback(tmp_path, capsys, make, expected):
    """--config reads a regular file of bounded size: a FIFO used to block the run for ever and a
    deeply nested YAML ended in PyYAML's RecursionError."""
    recipe = tmp_path / "recipe.yaml"
    make(recipe)
    line = config_error(["--config", str(recipe), "--data", "d", "--output-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("training/pretrain.py: error: ") and expected in line and "recipe.yaml" in line, line
    assert not (tmp_path / "out").exists()

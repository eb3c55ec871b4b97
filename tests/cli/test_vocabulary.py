"""One spelling per concept across mec-embed, every mec-hub command and training/pretrain.py.

The expected vocabulary is written out here, independently of ``mec_hub.cli.common.SPELLINGS``: the
table in README's "Command lines" section, as a user reads it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from mec_hub.cli.embed import main as embed_main
from mec_hub.cli.hub import main as hub_main
from training import config as train_config
from training import pretrain

REPO_ROOT = Path(__file__).resolve().parents[2]

# concept -> the option names every command that has the concept declares (long and short forms).
VOCABULARY = {
    "out": {"-o", "--out"},
    "output_dir": {"--output-dir"},
    "num_workers": {"-j", "--num-workers"},
    "device": {"--device"},
    "top_k": {"-k", "--top-k"},
    "batch_size": {"-b", "--batch-size"},
    "model": {"-m", "--model"},
    "weights": {"--weights"},
    "weight_decay": {"--weight-decay"},
}
# Old spellings: accepted for a release, never shown in --help.
OLD = {"--k": "top_k", "--workers": "num_workers", "--wd": "weight_decay"}
# Commands and the concepts they must have (so that a renamed option cannot silently drop out).
EXPECTED = {
    "mec-embed": {"out", "num_workers", "device", "batch_size", "model", "weights"},
    "mec-hub download": {"weights"},
    "mec-hub convert": {"out"},
    "mec-hub export": {"out"},
    "mec-hub plot": {"out"},
    "mec-hub index": {"out"},
    "mec-hub search": {"top_k", "device", "weights"},
    "mec-hub serve": {"device", "weights"},
    "mec-hub eval knn": {"out", "num_workers", "device", "top_k", "batch_size", "model", "weights"},
    "mec-hub eval linear": {
        "out", "output_dir", "num_workers", "device", "batch_size", "model", "weights", "weight_decay"
    },
    "mec-hub eval finetune": {"out", "output_dir", "num_workers", "device", "batch_size", "model", "weights"},
    "training/pretrain.py": {"output_dir", "num_workers", "device", "batch_size", "weight_decay"},
}


def commands() -> list[tuple[list[str], click.Command]]:
    """Every command line: (the words that run it, the command), groups included."""
    found: list[tuple[list[str], click.Command]] = [(["mec-embed"], embed_main)]

    def walk(command: click.Command, words: list[str]) -> None:
        found.append((words, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*words, name])

    walk(hub_main, ["mec-hub"])
    return found


def click_help(words: list[str]) -> str:
    main = embed_main if words[0] == "mec-embed" else hub_main
    result = CliRunner().invoke(main, [*words[1:], "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pretrain_help() -> str:
    done = subprocess.run(
        [sys.executable, "training/pretrain.py", "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def shown_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text))


def concepts_of(names: set[str]) -> set[str]:
    return {concept for concept, spelled in VOCABULARY.items() if names & spelled}


def test_each_concept_is_spelled_the_same_in_every_command(pretrain_help: str):
    seen: dict[str, set[str]] = {}
    for words, command in commands():
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            names = set(param.opts) | set(param.secondary_opts)
            for concept in concepts_of(names):
                assert names == VOCABULARY[concept], (" ".join(words), concept, names)
                seen.setdefault(" ".join(words), set()).add(concept)
    parser = pretrain.build_parser()
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings:
            continue
        names = set(action.option_strings)
        for concept in concepts_of(names):
            assert names == VOCABULARY[concept], ("training/pretrain.py", concept, names)
            seen.setdefault("training/pretrain.py", set()).add(concept)
    for command, concepts in EXPECTED.items():
        assert seen.get(command, set()) == concepts, command
    # The help text shows the same: `-j N, --num-workers N` in pretrain.py's --help.
    assert re.search(r"-j N, --num-workers N", pretrain_help) and re.search(r"-b \w+, --batch-size", pretrain_help)


def test_no_old_spelling_is_shown_in_any_help(pretrain_help: str):
    for words, _ in commands():
        shown = shown_flags(click_help(words))
        assert not shown & set(OLD), (" ".join(words), shown & set(OLD))
    assert not shown_flags(pretrain_help) & set(OLD)
    assert "--workers" not in pretrain_help and "--wd" not in pretrain_help


def test_every_command_has_a_one_line_description(pretrain_help: str):
    listings = {  # the Commands: section of each group's --help
        " ".join(words): click_help(words).split("\nCommands:\n")[1]
        for words, command in commands()
        if isinstance(command, click.Group)
    }
    for words, command in commands():
        description = command.get_short_help_str(limit=1000)
        assert description and not description.endswith("..."), words
        assert "\n" not in description and len(description) <= 70, (words, description)
        if len(words) > 1:  # listed by its group on one line, not cut
            listing = listings[" ".join(words[:-1])]
            entry = re.search(rf"^  {re.escape(words[-1])} +(.+)\n(?!   )", listing, re.MULTILINE)
            assert entry is not None and entry.group(1) == description, (words, listing)
    assert pretrain_help.split("\n\n")[1].count("\n") == 0  # the description line under the usage


def test_mec_hub_help_names_what_it_does():
    text = " ".join(click_help(["mec-hub"]).split("Options:")[0].split())
    for command in ("list", "download", "convert", "export", "push", "eval", "search", "index", "serve", "plot"):
        assert re.search(rf"\b{command}\b", text), command
    assert "mec-embed" in text and "FEATS.parquet" in text


@pytest.mark.parametrize("words", [["search"], ["serve"], ["index"]])
def test_feature_set_commands_name_parquet_not_only_npy(words: list[str]):
    text = " ".join(click_help(["mec-hub", *words]).split())
    assert "FEATS.parquet" in text and "FEATS.npy" in text and "shards" in text
    assert "a .npy written" not in text


def test_old_spellings_still_work_with_a_warning(capsys: pytest.CaptureFixture[str]):
    knn = hub_main.commands["eval"].commands["knn"]
    assert knn.make_context("knn", ["--k", "3"]).params["k"] == 3
    assert "Warning: --k is deprecated" in capsys.readouterr().err
    assert knn.make_context("knn", ["--top-k", "4", "--k", "3"]).params["k"] == 4  # the new spelling wins
    assert "Warning: --k is deprecated" in capsys.readouterr().err
    assert knn.make_context("knn", ["-k", "7"]).params["k"] == 7
    assert knn.make_context("knn", []).params["k"] == 20
    assert capsys.readouterr().err == ""

    config = train_config.parse_args(["--workers", "3", "--wd", "0.25"])
    assert (config.num_workers, config.weight_decay) == (3, 0.25)
    err = capsys.readouterr().err
    assert "--workers is deprecated" in err and "use --num-workers" in err
    assert "--wd is deprecated" in err and "use --weight-decay" in err
    assert train_config.parse_args(["-j", "2", "-b", "64"]).num_workers == 2
    assert capsys.readouterr().err == ""


def test_an_old_key_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert train_config.checked_values({"workers": 5}, source="old.yaml") == {"num_workers": 5}
    assert "old.yaml: key 'workers' is deprecated" in capsys.readouterr().err
    with pytest.raises(train_config.ConfigError, match="old name of 'num_workers'"):
        train_config.checked_values({"workers": 5, "num_workers": 6}, source="both.yaml")
    # The shipped recipes use the new key: they read without a warning.
    for recipe in sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")):
        pytest.importorskip("yaml")
        train_config.read_yaml(recipe)
        assert capsys.readouterr().err == "", recipe


# Each command with --device, and arguments that would otherwise get it past parsing.
DEVICE_COMMANDS = [
    (embed_main, ["photos/", "--out", "f.npy"]),
    (hub_main, ["search", "feats.npy", "q.jpg"]),
    (hub_main, ["serve", "feats.npy"]),
    (hub_main, ["eval", "knn", "--train-features", "a.npy", "--val-features", "b.npy"]),
]


@pytest.mark.parametrize(("main", "args"), DEVICE_COMMANDS, ids=["embed", "search", "serve", "eval"])
@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("gpu", "is not a device; use auto, cpu, cuda, cuda:N or mps"),
        ("cuda:0 ", "is not a device"),
        ("CPU", "is not a device"),
        ("cpu:0", "is not a device"),
        ("cuda", "asks for CUDA, but torch"),
        ("cuda:3", "asks for CUDA, but torch"),
        ("mps", "asks for MPS"),
    ],
)
def test_a_bad_device_is_a_usage_error_naming_the_flag(
    main: click.Command, args: list[str], device: str, reason: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = CliRunner().invoke(main, [*args, "--device", device])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0].startswith(f"Error: Invalid value for '--device': {device!r} {reason}")
    assert "Traceback" not in result.output


def test_a_gpu_that_is_not_there(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = CliRunner().invoke(embed_main, ["photos/", "--out", "f.npy", "--device", "cuda:2"])
    assert result.exit_code == 2
    assert "Error: Invalid value for '--device': 'cuda:2' does not exist: 2 GPU(s) visible" in result.output


@pytest.mark.parametrize("device", ["cpu:1", "tpu", "cuda:7"])
def test_pretrain_takes_the_same_grammar(
    device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        pretrain.main(["--data", str(tmp_path), "--output-dir", str(out), "--device", device])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"training/pretrain.py: error: --device {device} "), err
    assert not out.exists()

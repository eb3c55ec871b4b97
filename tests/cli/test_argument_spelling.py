"""A Python error names the Python argument (``weights=``), a command-line error the flag (``--weights``).

The library writes its messages in Python's words and says which arguments they name
(``MecHubError.arguments``); the command line rewrites those into its flags
(``mec_hub.cli.common.cli_message``). Each test makes one mistake both ways.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mec_hub.cli.embed import main as embed_main
from mec_hub.cli.hub import main as hub_main
from mec_hub.embedding.engine import Embedder
from mec_hub.embedding.outputs import OutputError
from mec_hub.errors import InvalidArgumentError
from mec_hub.evaluation.splits import load_eval_model
from tests.support.embedding import make_images
from tests.support.paths import REPO_ROOT

NAME = "mec_resnet18_cifar10s"


def _one_line(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: "), result.output
    return " ".join(result.output.split())


def test_random_init_with_two_architectures(tiny_weights_dir: Path, tmp_path: Path):
    with pytest.raises(InvalidArgumentError) as info:
        load_eval_model(NAME, weights=tiny_weights_dir, random_init=True)
    python = str(info.value)
    assert "name= and weights= were both given with random_init=True" in python
    assert "--" not in python

    for split in ("train", "val"):
        (tmp_path / split / "c0").mkdir(parents=True)
    args = ["eval", "knn", "--model", NAME, "--weights", str(tiny_weights_dir), "--random-init"]
    line = _one_line(  # options that contradict each other: a usage error
        CliRunner().invoke(hub_main, [*args, "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val")]),
        exit_code=2,
    )
    assert "--model and --weights were both given with --random-init" in line
    assert "name=" not in line and "weights=" not in line and "random_init" not in line


def test_existing_output_without_overwrite(tiny_weights_dir: Path, tmp_path: Path):
    images = tmp_path / "images"
    make_images(images, 2)
    out = tmp_path / "f.npy"
    embedder = Embedder(weights=tiny_weights_dir, device="cpu", num_workers=0)
    embedder.embed_folder(images, out, progress=False)
    with pytest.raises(OutputError) as info:
        embedder.embed_folder(images, out, progress=False)
    python = str(info.value)
    assert "already exist" in python and "pass overwrite=True" in python and "--" not in python

    args = [str(images), "--out", str(out), "--weights", str(tiny_weights_dir), "--device", "cpu", "-j", "0", "-q"]
    line = _one_line(CliRunner().invoke(embed_main, args))
    assert "already exist" in line and "pass --overwrite to replace" in line and "overwrite=" not in line


def test_the_arguments_a_message_names_survive_the_gather_across_processes():
    from mec_hub.cli.common import cli_message
    from mec_hub.embedding.job import ResumeError, _agreed

    class Group:  # each process raises the first failure gathered from all, rebuilt from its text
        def all_gather(self, value):
            return [None, value]

    original = ResumeError("the partial files are missing; pass overwrite=True", arguments=("overwrite",))

    def refuse():
        raise original

    with pytest.raises(ResumeError) as info:
        _agreed(Group(), refuse)
    assert info.value is not original and str(info.value) == str(original)
    assert cli_message(info.value) == "the partial files are missing; pass --overwrite"


# A flag in a library message is allowed only inside a whole command (``mec-hub convert X --out DIR``,
# ``torchrun --nproc_per_node``): one shown as the argument of the current call is what is refused.
COMMANDS = ("mec-hub ", "mec-embed ", "torchrun ", "hf ")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _text(node: ast.AST) -> str:
    """The strings in ``node``, in order, with each formatted value as ``{}``."""
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.Constant):
        return node.value if isinstance(node.value, str) else ""
    return "".join(_text(child) for child in ast.iter_child_nodes(node))


def _raised_messages(path: Path) -> list[tuple[int, str]]:
    """The text of each ``raise`` of ``path``, and of what each ``*_message`` helper returns."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = [node.exc for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None]
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name.endswith("_message"):
            nodes += [node.value for node in ast.walk(function) if isinstance(node, ast.Return) and node.value]
    return [(node.lineno, _text(node)) for node in nodes]


def _bare_flags(message: str) -> list[str]:
    outside_backticks = re.sub(r"`[^`]*`", "``", message)
    bare = []
    for match in FLAG.finditer(outside_backticks):
        clause = re.split(r"[;.] ", outside_backticks[: match.start()])[-1]
        if not any(command in clause for command in COMMANDS):
            bare.append(match.group())
    return bare


def test_library_errors_name_python_arguments_not_flags():
    library = REPO_ROOT / "mec_hub"
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {', '.join(flags)}"
        for path in sorted(library.rglob("*.py"))
        if "cli" not in path.relative_to(library).parts
        for line, message in _raised_messages(path)
        if (flags := _bare_flags(message))
    ]
    assert found == []
    # The check does see a flag where one is: the messages the command line itself raises have them.
    assert any(_bare_flags(message) for _, message in _raised_messages(library / "cli" / "evaluate.py"))

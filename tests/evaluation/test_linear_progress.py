"""The linear probe's progress bar: on stderr when stderr is a terminal (or ``progress=True``), else nothing."""

from __future__ import annotations

import sys

import pytest
import torch

from mec_hub.evaluation.linear import linear_probe

WEIGHT_DECAYS = (1e-4, 1e-2, 1.0)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.randn(3, 8, generator=torch.Generator().manual_seed(99)) * 3
    return centres[labels] + torch.randn(n, 8, generator=generator), labels


def _probe(**kwargs: object):
    train, train_labels = _blobs(90, seed=0)
    val, val_labels = _blobs(30, seed=1)
    return linear_probe(train, train_labels, val, val_labels, weight_decays=WEIGHT_DECAYS, seed=0, **kwargs)


def _pretend_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # a weight decay at the grid's edge is a warning, not output
def test_a_terminal_gets_a_bar_counting_the_fits(capsys: pytest.CaptureFixture[str], monkeypatch):
    silent = _probe()
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal
    _pretend_stderr_is_a_terminal(monkeypatch)
    shown = _probe()
    err = capsys.readouterr().err
    # tqdm's bar: description, the fits done of the 3 sweep fits + the final one, elapsed<remaining.
    assert "linear probe" in err and "/4 " in err and "fit" in err and "<" in err
    # The bar changes nothing of the result.
    assert (shown.top1, shown.weight_decay, shown.sweep) == (silent.top1, silent.weight_decay, silent.sweep)
    assert torch.equal(shown.classifier.weight, silent.classifier.weight)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_progress_true_or_false_overrides_the_terminal_rule(capsys: pytest.CaptureFixture[str], monkeypatch):
    _probe(progress=True)
    assert "linear probe" in capsys.readouterr().err
    _pretend_stderr_is_a_terminal(monkeypatch)
    _probe(progress=False)
    assert capsys.readouterr().err == ""


def test_one_weight_decay_is_one_fit(capsys: pytest.CaptureFixture[str]):
    train, labels = _blobs(60, seed=2)
    linear_probe(train, labels, train, labels, weight_decays=(1e-2,), progress=True)
    assert "/1 " in capsys.readouterr().err


def test_the_rule_follows_stderr_unless_told(monkeypatch: pytest.MonkeyPatch):
    import io

    from mec_hub.progress import progress_enabled

    class Closed(io.StringIO):
        def isatty(self) -> bool:
            raise ValueError("I/O operation on closed file")

    for stream, want in ((io.StringIO(), False), (Closed(), False), (None, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert progress_enabled() is want
        assert progress_enabled(True) is True and progress_enabled(False) is False
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress_enabled() is True and progress_enabled(False) is False

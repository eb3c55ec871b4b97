"""training/engine.py's bookkeeping: precision settings, the step's options, and the log statistics.

Written for mutants that survived the first mutation pass (TESTING.md); the values are checked
against sums and means computed here by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mec_hub.models.losses import MECLoss, MECLossOutput
from training.engine import EpochTotals, NonFiniteLossError, Precision, StepStats, train_step
from training.schedules import ScheduleValues


def test_precision_names_and_what_they_turn_on():
    with pytest.raises(ValueError, match="one of fp32, bf16, fp16, not 'fp8'"):
        Precision("fp8", "cpu")
    layer, x = nn.Linear(4, 3), torch.randn(2, 4)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with Precision(name, "cpu").autocast():
            assert layer(x).dtype == dtype, name
    assert Precision("fp32", "cpu").grad_scaler() is None
    assert Precision("bf16", "cpu").grad_scaler() is None
    scaler = Precision("fp16", "cpu").grad_scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()


class TwoViews(nn.Module):
    """A student (linear) whose outputs serve as predictions; a fixed teacher for the targets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(6, 5)
        self.teacher = nn.Linear(6, 5).requires_grad_(False)

    def forward(self, x1, x2):
        return self.student(x1), self.student(x2), self.teacher(x1), self.teacher(x2)


def one_step(precision: str, *, scaler: bool, **kwargs) -> tuple[nn.Module, MECLossOutput, list[float]]:
    model = TwoViews()
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.0)
    momenta: list[float] = []
    g = torch.Generator().manual_seed(1)
    views = (torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g))
    p = Precision(precision, "cpu")
    out = train_step(model, momenta.append, MECLoss(warn_on_divergence=False), optimizer, views,
                     ScheduleValues(lr=0.1, teacher_momentum=0.99, lamda_inv=4.0), p,
                     p.grad_scaler() if scaler else None, **kwargs)
    return model, out, momenta


def test_the_step_estimates_the_norm_unless_told_not_to():
    assert math.isfinite(float(one_step("fp32", scaler=False)[1].spectral_norm))  # the default
    assert math.isfinite(float(one_step("fp32", scaler=False, estimate_norm=True)[1].spectral_norm))
    assert math.isnan(float(one_step("fp32", scaler=False, estimate_norm=False)[1].spectral_norm))


def test_an_fp16_step_with_the_scaler_moves_the_weights_as_one_without():
    before = TwoViews().student.weight.detach().clone()
    plain, _, _ = one_step("fp16", scaler=False)
    scaled, _, momenta = one_step("fp16", scaler=True)
    assert momenta == [0.99]
    moved = plain.student.weight.detach() - before
    assert moved.abs().max() > 1e-4
    # the scaler multiplies the loss by 2**16 and divides the gradients back before the step
    torch.testing.assert_close(scaled.student.weight.detach() - before, moved, rtol=1e-3, atol=1e-6)


def out(loss: float, coding: float = 1.0, spectral: float = 0.5) -> MECLossOutput:
    return MECLossOutput(torch.tensor(loss), torch.tensor(coding), torch.tensor(spectral))


def test_step_stats_means_max_and_skipped_estimates():
    stats = StepStats(first_step=10)
    stats.check_finite(steps_per_epoch=5)  # nothing added yet: nothing to check
    assert stats.flush(steps_per_epoch=5) == {}
    for row in (out(-1.0, 2.0, 0.25), out(-3.0, 4.0, math.nan), out(-2.0, 6.0, 0.75)):
        stats.add(row)
    stats.check_finite(steps_per_epoch=5)  # a skipped estimate (NaN spectral norm) is not a failure
    assert stats.flush(steps_per_epoch=5) == {"loss": -2.0, "coding_length": 4.0, "spectral_norm": 0.75}
    assert stats.first_step == 13 and len(stats) == 0
    stats.add(out(-1.0, 2.0, math.nan))
    summary = stats.flush(steps_per_epoch=5)
    assert summary["loss"] == -1.0 and math.isnan(summary["spectral_norm"])


@pytest.mark.parametrize("bad", [out(math.nan, 1.0), out(-1.0, math.inf)])
def test_a_non_finite_loss_or_coding_length_names_its_step(bad):
    stats = StepStats(first_step=5)
    stats.add(out(-1.0))
    stats.add(bad)  # the 7th step: epoch 2, its 2nd step of 5
    with pytest.raises(NonFiniteLossError, match=r"at step 7 \(epoch 2, step 2 of 5\).*lower the lr"):
        stats.check_finite(steps_per_epoch=5, advice="lower the lr")


def test_step_stats_survive_a_state_dict_round_trip():
    stats = StepStats(first_step=4)
    stats.add(out(-1.0, 2.0, 0.5))
    stats.add(out(-3.0, 6.0, 0.25))
    copy = StepStats()
    copy.load_state_dict(stats.state_dict())
    assert copy.first_step == 4 and len(copy) == 2
    assert copy.flush(steps_per_epoch=10) == {"loss": -2.0, "coding_length": 4.0, "spectral_norm": 0.5}
    empty = StepStats()
    empty.load_state_dict(StepStats(first_step=7).state_dict())
    assert empty.first_step == 7 and len(empty) == 0


def test_epoch_totals_weight_windows_by_their_steps_and_round_trip():
    totals = EpochTotals()
    totals.add({"loss": -1.0, "coding_length": 2.0, "spectral_norm": 0.5}, 3)
    totals.add({"loss": -5.0, "coding_length": 10.0, "spectral_norm": math.nan}, 1)
    totals.add({"loss": -2.0, "coding_length": 4.0, "spectral_norm": 0.25}, 4)
    want = {"loss": (-3 - 5 - 8) / 8, "coding_length": (6 + 10 + 16) / 8, "spectral_norm": 0.5}
    assert totals.means() == pytest.approx(want)
    copy = EpochTotals()
    copy.load_state_dict(totals.state_dict())
    assert copy == totals and copy.means() == pytest.approx(want)
    unestimated = EpochTotals()
    unestimated.add({"loss": -1.0, "coding_length": 2.0, "spectral_norm": math.nan}, 2)
    assert math.isnan(unestimated.means()["spectral_norm"])
    restored = EpochTotals()
    restored.load_state_dict(unestimated.state_dict())
    assert restored.means()["loss"] == -1.0 and math.isnan(restored.means()["spectral_norm"])

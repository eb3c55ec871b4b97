"""Schedules against their formulas at chosen steps, and against the official numpy construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.schedules import Schedules

SPE, EPOCHS, WARMUP = 10, 20, 3  # steps per epoch, epochs, warm-up epochs


@pytest.fixture
def schedules() -> Schedules:
    return Schedules(
        total_steps=EPOCHS * SPE,
        lr=1.0,
        lr_warmup_steps=WARMUP * SPE,
        lamda_inv=32.0,
        lamda_warmup_steps=WARMUP * SPE,
        lamda_warmup_factor=8.0,
        teacher_momentum=0.996,
    )


def test_lr_warms_up_linearly_from_zero_then_decays_by_half_cosine(schedules):
    w, total = WARMUP * SPE, EPOCHS * SPE
    assert schedules.at(0).lr == 0.0
    assert schedules.at(w // 2).lr == pytest.approx((w // 2) / (w - 1))  # linspace(0, 1, w)
    assert schedules.at(w - 1).lr == pytest.approx(1.0)
    assert schedules.at(w).lr == pytest.approx(1.0)  # the cosine starts at the peak
    half = w + (total - w) // 2
    assert schedules.at(half).lr == pytest.approx(0.5)
    assert schedules.at(total - 1).lr == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - w - 1) / (total - w))))
    assert schedules.at(total - 1).lr < 1e-3


def test_teacher_momentum_rises_from_0996_to_1_by_cosine_without_warmup(schedules):
    total = EPOCHS * SPE
    assert schedules.at(0).teacher_momentum == pytest.approx(0.996)
    assert schedules.at(total // 2).teacher_momentum == pytest.approx(0.998)
    assert schedules.at(total // 4).teacher_momentum == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert 0.99999 < schedules.at(total - 1).teacher_momentum < 1.0


def test_lamda_inverse_goes_from_eight_times_to_once_then_stays(schedules):
    w = WARMUP * SPE
    assert schedules.at(0).lamda_inv == pytest.approx(8 * 32.0)
    assert schedules.at(w - 1).lamda_inv == pytest.approx(32.0)
    assert schedules.at(10).lamda_inv == pytest.approx(256 - (256 - 32) * 10 / (w - 1))
    assert schedules.at(w).lamda_inv == schedules.at(EPOCHS * SPE - 1).lamda_inv == 32.0


def official_cosine(base, final, epochs, spe, warmup_epochs=0, start=0.0):
    """The official ``cosine_scheduler``, re-derived with numpy (linspace warm-up + cosine)."""
    warmup = np.linspace(start, base, warmup_epochs * spe) if warmup_epochs else np.array([])
    iters = np.arange(epochs * spe - warmup_epochs * spe)
    return np.concatenate((warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def test_every_step_matches_the_official_numpy_schedules(schedules):
    lr = official_cosine(1.0, 0.0, EPOCHS, SPE, WARMUP)
    momentum = official_cosine(0.996, 1.0, EPOCHS, SPE)
    lamda = np.concatenate((np.linspace(8 * 32.0, 32.0, WARMUP * SPE), np.full((EPOCHS - WARMUP) * SPE, 32.0)))
    for step in range(EPOCHS * SPE):
        values = schedules.at(step)
        assert values.lr == pytest.approx(lr[step], rel=1e-12, abs=1e-15)
        assert values.teacher_momentum == pytest.approx(momentum[step], rel=1e-12)
        assert values.lamda_inv == pytest.approx(lamda[step], rel=1e-12)


def test_no_warmup_and_warmup_longer_than_the_run():
    plain = Schedules(total_steps=10, lr=2.0, lr_warmup_steps=0, lamda_inv=4.0, lamda_warmup_steps=0)
    assert plain.at(0).lr == 2.0 and plain.at(0).lamda_inv == 4.0
    long = Schedules(total_steps=5, lr=2.0, lr_warmup_steps=20, lamda_inv=4.0, lamda_warmup_steps=20)
    assert long.at(4).lr == pytest.approx(2.0 * 4 / 19)  # still warming up when the run ends
    assert long.at(4).lamda_inv == pytest.approx(32.0 - 28.0 * 4 / 19)


def test_out_of_range_steps_and_bad_settings_are_refused(schedules):
    with pytest.raises(IndexError):
        schedules.at(EPOCHS * SPE)
    with pytest.raises(ValueError, match="at least one step"):
        Schedules(total_steps=0, lr=1.0, lr_warmup_steps=0, lamda_inv=1.0, lamda_warmup_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        Schedules(total_steps=5, lr=1.0, lr_warmup_steps=0, lamda_inv=1.0, lamda_warmup_steps=0, teacher_momentum=1.5)


@pytest.mark.parametrize("warmup", [1, 2])
def test_one_and_two_step_warmups_match_numpy(warmup):
    """``np.linspace(start, stop, 1)`` is ``[start]``, ``np.linspace(start, stop, 2)`` is ``[start, stop]``."""
    s = Schedules(total_steps=6, lr=2.0, lr_warmup_steps=warmup, lamda_inv=4.0, lamda_warmup_steps=warmup)
    lr = official_cosine(2.0, 0.0, 6, 1, warmup)
    lamda = np.concatenate((np.linspace(32.0, 4.0, warmup), np.full(6 - warmup, 4.0)))
    for step in range(6):
        assert s.at(step).lr == pytest.approx(lr[step], rel=1e-12, abs=1e-15)
        assert s.at(step).lamda_inv == pytest.approx(lamda[step], rel=1e-12)


def test_final_lr_is_where_the_cosine_ends():
    s = Schedules(total_steps=40, lr=1.0, lr_warmup_steps=10, lamda_inv=1.0, lamda_warmup_steps=0, final_lr=0.25)
    lr = official_cosine(1.0, 0.25, 4, 10, 1)
    assert [s.at(step).lr for step in range(40)] == pytest.approx(lr.tolist(), rel=1e-12)
    assert 0.25 < s.at(39).lr < 0.26


def test_one_step_run_and_boundary_momenta_are_accepted():
    one = Schedules(total_steps=1, lr=1.0, lr_warmup_steps=0, lamda_inv=2.0, lamda_warmup_steps=0)
    assert (one.at(0).lr, one.at(0).lamda_inv, one.at(0).teacher_momentum) == (1.0, 2.0, pytest.approx(0.996))
    for momentum in (0.0, 1.0):  # [0, 1] closed: a teacher copied every step, a frozen teacher
        s = Schedules(total_steps=4, lr=1.0, lr_warmup_steps=0, lamda_inv=1.0, lamda_warmup_steps=0,
                      teacher_momentum=momentum)
        assert s.at(0).teacher_momentum == momentum


@pytest.mark.parametrize("name", ["lr_warmup_steps", "lamda_warmup_steps"])
def test_negative_warmups_are_refused_by_name(name, schedules):
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
        Schedules(**{"total_steps": 5, "lr": 1.0, "lr_warmup_steps": 0, "lamda_inv": 1.0, "lamda_warmup_steps": 0,
                     name: -1})
    with pytest.raises(IndexError, match="step -1 outside the run's 200 steps"):
        schedules.at(-1)

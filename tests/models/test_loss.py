"""coding_length and MECLoss against independent references: slogdet, the plain power series, the official formula."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mec_hub.models.losses as loss_module
from mec_hub.models.losses import MECLoss, coding_length, spectral_norm_estimate

SHAPES = [(6, 9), (9, 6)]  # m < d (batch-side matrix smaller) and m > d (feature side smaller)


def views(m: int, d: int, *, seed: int = 0, noise: float = 0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(m, d, generator=g, dtype=dtype)
    return z1, z1 + noise * torch.randn(m, d, generator=g, dtype=dtype)


def unit(z):
    return z / z.norm(dim=1, keepdim=True)


def lamda_for(z1, z2, spectral_norm: float) -> float:
    """The lamda that gives C = lamda * z1 z2^T (unit rows) the wanted spectral norm."""
    return spectral_norm / float(torch.linalg.matrix_norm(unit(z1) @ unit(z2).T, ord=2))


def power_series(z1, z2, lamda, order):
    """Reference: tr(sum_k (-1)^(k+1)/k C^k) with C^k by successive m x m products."""
    c = lamda * unit(z1) @ unit(z2).T
    power, total = torch.eye(c.shape[0], dtype=c.dtype), torch.zeros_like(c)
    for k in range(1, order + 1):
        power = power @ c
        total = total + (-1) ** (k + 1) / k * power
    return torch.trace(total)


def exact_logdet(z1, z2, lamda):
    """Reference: log det(I_m + lamda z1 z2^T) on the m x m matrix."""
    sign, value = torch.linalg.slogdet(torch.eye(z1.shape[0], dtype=z1.dtype) + lamda * unit(z1) @ unit(z2).T)
    assert sign > 0
    return value


# --------------------------------------------------------------------------------------------
# coding_length


@pytest.mark.parametrize(("m", "d"), SHAPES)
def test_exact_form_equals_slogdet(m, d):
    z1, z2 = views(m, d)
    lamda = lamda_for(z1, z2, 0.7)
    torch.testing.assert_close(
        coding_length(z1, z2, lamda, order=None), exact_logdet(z1, z2, lamda), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(("m", "d"), SHAPES)
def test_series_converges_to_slogdet(m, d):
    z1, z2 = views(m, d)
    rho = 0.3
    lamda = lamda_for(z1, z2, rho)
    reference = exact_logdet(z1, z2, lamda)
    torch.testing.assert_close(coding_length(z1, z2, lamda, order=40), reference, rtol=1e-12, atol=1e-14)
    # Order 4 is off by the tail of the series: |sum_{k>4} tr(C^k)/k| <= n rho^5 / (5 (1 - rho)).
    n = min(m, d)
    error = abs(float(coding_length(z1, z2, lamda, order=4) - reference))
    assert error <= n * rho**5 / (5 * (1 - rho))
    assert error > 1e-8  # and it is the truncated series, not the exact value


@pytest.mark.parametrize(("m", "d"), SHAPES)
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
def test_values_and_gradients_equal_the_plain_power_series(m, d, order):
    z1, z2 = (z.requires_grad_() for z in views(m, d, seed=order))
    lamda = lamda_for(z1.detach(), z2.detach(), 0.9)
    ours = coding_length(z1, z2, lamda, order)
    reference = power_series(z1, z2, lamda, order)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(ours, (z1, z2))
    reference_grads = torch.autograd.grad(reference, (z1, z2))
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("order", [2, 4, 5, None])
def test_sample_and_feature_forms_are_equal(order):
    z1, z2 = (z.requires_grad_() for z in views(7, 5, seed=3))
    lamda = 0.1
    results = []
    for gram in ("samples", "features"):
        value = coding_length(z1, z2, lamda, order, gram=gram)
        results.append((value, *torch.autograd.grad(value, (z1, z2))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize(("m", "d"), SHAPES)
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, None])
def test_gradcheck(m, d, order):
    z1, z2 = (z.requires_grad_() for z in views(m, d, seed=1))
    assert torch.autograd.gradcheck(lambda a, b: coding_length(a, b, 0.3, order), (z1, z2))


def test_gradcheck_without_normalisation():
    z1, z2 = (unit(z).detach().requires_grad_() for z in views(5, 8, seed=2))
    assert torch.autograd.gradcheck(lambda a, b: coding_length(a, b, 0.5, 4, normalize=False), (z1, z2))


@pytest.mark.parametrize(("m", "d"), SHAPES)
def test_gradient_is_close_to_the_exact_logdet_gradient(m, d):
    z1, z2 = (z.requires_grad_() for z in views(m, d, seed=4))
    lamda = lamda_for(z1.detach(), z2.detach(), 0.1)
    series = torch.autograd.grad(coding_length(z1, z2, lamda, 4), (z1, z2))
    exact = torch.autograd.grad(exact_logdet(z1, z2, lamda), (z1, z2))
    for got, want in zip(series, exact, strict=True):
        # The truncation error of the gradient is O(rho^4) relative to its size.
        assert float((got - want).norm() / want.norm()) < 1e-3


def test_computes_in_float32_under_autocast_and_for_low_precision_inputs():
    z1, z2 = views(16, 32, dtype=torch.float32)
    lamda = lamda_for(z1, z2, 0.5)
    plain = coding_length(z1, z2, lamda)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = coding_length(z1, z2, lamda)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    low = coding_length(z1.bfloat16(), z2.bfloat16(), lamda)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, coding_length(z1.bfloat16().float(), z2.bfloat16().float(), lamda))


def test_bad_inputs_are_refused_with_clear_errors():
    z1, z2 = views(4, 6)
    with pytest.raises(ValueError, match="2-D"):
        coding_length(z1[0], z2[0], 0.1)
    with pytest.raises(ValueError, match="same shape"):
        coding_length(z1, z2[:3], 0.1)
    with pytest.raises(ValueError, match="lamda must be a positive"):
        coding_length(z1, z2, 0.0)
    with pytest.raises(ValueError, match="order"):
        coding_length(z1, z2, 0.1, order=0)
    with pytest.raises(ValueError, match="gram"):
        coding_length(z1, z2, 0.1, gram="rows")
    with pytest.raises(TypeError, match="floating-point"):
        coding_length(z1.long(), z2.long(), 0.1)
    bad = z2.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="z2 holds non-finite"):
        coding_length(z1, bad, 0.1)
    with pytest.raises(ValueError, match="z1 holds non-finite"):
        coding_length(bad, z1, 0.1, order=None)


# --------------------------------------------------------------------------------------------
# MECLoss


def official_loss(p1, z1, p2, z2, lamda_inv, order=4):
    """The official training loss, written from the paper's recipe: (p = teacher, z = student).

    mec = (loss_func(teacher1, student2) + loss_func(teacher2, student1)) / 2 / m, loss = -mec * lamda_inv.
    """

    def loss_func(p, z):
        c = F.normalize(p) @ F.normalize(z).T / lamda_inv
        power, total = c, torch.zeros_like(c)
        for k in range(1, order + 1):
            if k > 1:
                power = power @ c
            total = total + power / k if k % 2 else total - power / k
        return torch.trace(total)

    m = p1.shape[0]
    mec = (loss_func(z1, p2) + loss_func(z2, p1)) * 0.5 / m
    return -mec * lamda_inv, mec


@pytest.mark.parametrize("lamda_inv", [None, 40.0])
def test_mec_loss_matches_the_official_formula(lamda_inv):
    m, d = 12, 20
    p1, z1 = views(m, d, seed=5)
    p2, z2 = views(m, d, seed=6)
    p1.requires_grad_()
    p2.requires_grad_()
    criterion = MECLoss(warn_on_divergence=False)
    out = criterion(p1, z1, p2, z2, lamda_inv=lamda_inv)
    expected_inv = lamda_inv if lamda_inv is not None else m * 64.0 / d  # paper: 1/lamda = m eps^2 / d
    loss, mec = official_loss(p1, z1, p2, z2, expected_inv)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.coding_length, mec.detach() * (m + d) / 2, rtol=1e-12, atol=1e-15)
    assert not out.coding_length.requires_grad
    for got, want in zip(torch.autograd.grad(out.loss, (p1, p2)), torch.autograd.grad(loss, (p1, p2)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_mec_loss_exact_order_uses_the_log_determinant():
    p1, z1 = views(8, 10, seed=7)
    p2, z2 = views(8, 10, seed=8)
    out = MECLoss(order=None, warn_on_divergence=False)(p1, z1, p2, z2, lamda_inv=50.0)
    mec = (exact_logdet(z2, p1, 1 / 50.0) + exact_logdet(z1, p2, 1 / 50.0)) / 2 / 8
    torch.testing.assert_close(out.loss, -mec * 50.0)


@pytest.mark.parametrize(("m", "d"), [(64, 32), (32, 64)])
def test_spectral_norm_estimate_is_close_to_the_true_norm_from_below(m, d):
    z1, z2 = views(m, d, seed=9, noise=0.3)
    lamda = 0.05
    true = float(torch.linalg.matrix_norm(lamda * unit(z1) @ unit(z2).T, ord=2))
    estimate = spectral_norm_estimate(z1, z2, lamda, iterations=10)
    # iid Gaussian views have no spectral gap: the hardest case for a cold start.
    assert 0.95 * true <= float(estimate.value) <= true * (1 + 1e-9)
    # Continuing from the returned vector is the same as iterating longer.
    resumed = spectral_norm_estimate(z1, z2, lamda, iterations=10, start=estimate.vector)
    torch.testing.assert_close(resumed.value, spectral_norm_estimate(z1, z2, lamda, iterations=20).value)
    assert abs(float(spectral_norm_estimate(z1, z2, lamda, iterations=200).value) / true - 1) < 1e-9


def test_mec_loss_reports_the_larger_pair_norm_and_keeps_its_vector_in_state_dict():
    z1, p1 = views(48, 24, seed=12, noise=0.3)
    z2, p2 = views(48, 24, seed=13, noise=0.3)
    lamda = 0.05
    criterion = MECLoss(power_iterations=10, warn_on_divergence=False)
    out = criterion(p1, z1, p2, z2, lamda_inv=1 / lamda)
    pair_norms = [float(torch.linalg.matrix_norm(lamda * unit(a) @ unit(b).T, ord=2)) for a, b in ((z2, p1), (z1, p2))]
    assert 0.95 * max(pair_norms) <= float(out.spectral_norm) <= max(pair_norms) * (1 + 1e-9)
    copy = MECLoss(power_iterations=10, warn_on_divergence=False)
    copy.load_state_dict(criterion.state_dict())
    torch.testing.assert_close(copy(p1, z1, p2, z2, 1 / lamda), criterion(p1, z1, p2, z2, 1 / lamda), rtol=0, atol=0)
    skipped = criterion(p1, z1, p2, z2, 1 / lamda, estimate_norm=False)
    assert math.isnan(float(skipped.spectral_norm))
    torch.testing.assert_close(skipped.loss, out.loss, rtol=0, atol=0)


def test_divergence_warns_once_with_the_value(monkeypatch):
    monkeypatch.setattr(loss_module, "_divergence_warned", False)
    p1, z1 = views(16, 8, seed=10, noise=0.1)
    p2, z2 = views(16, 8, seed=11, noise=0.1)
    criterion = MECLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        criterion(p1, z1, p2, z2, lamda_inv=4.0)  # ||C|| ~ 16/4: far outside the series' region
        criterion(p1, z1, p2, z2, lamda_inv=4.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "estimated at" in messages[0] and ">= 1" in messages[0]
    value = float(messages[0].split("estimated at ")[1].split(",")[0])
    assert value > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(loss_module, "_divergence_warned", False)
        criterion(p1, z1, p2, z2)  # the paper's lamda keeps ||C|| < 1: no warning


def test_gather_distributed_needs_an_initialised_process_group():
    p, z = views(4, 6)
    with pytest.raises(ValueError, match="not initialised"):
        MECLoss(gather_distributed=True)(p, z, p, z)


def test_mec_loss_checks_shapes():
    p, z = views(4, 6)
    with pytest.raises(ValueError, match="z2 must be"):
        MECLoss()(p, z, p, z[:, :5])


# --------------------------------------------------------------------------------------------
# MECLoss settings (mutants that survived the first mutation pass, TESTING.md)


def test_mec_loss_refuses_bad_settings_and_accepts_the_edges():
    p, z = views(6, 8)
    for eps2 in (-1.0, 0.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="eps2 must be positive"):
            MECLoss(eps2=eps2)
    assert MECLoss(eps2=0.5).lamda(6, 8) == 8 / (6 * 0.5)  # lamda = d / (m eps^2), any eps^2 > 0
    for order in (0, -1, 1.5):
        with pytest.raises(ValueError, match="order must be a positive int"):
            MECLoss(order=order)
    out = MECLoss(order=1, warn_on_divergence=False)(p, z, p, z, lamda_inv=3.0)  # order 1: tr(C)
    torch.testing.assert_close(out.loss, official_loss(p, z, p, z, 3.0, order=1)[0])
    criterion = MECLoss(warn_on_divergence=False)
    for lamda_inv in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lamda_inv must be positive"):
            criterion(p, z, p, z, lamda_inv=lamda_inv)
    out = criterion(p, z, p, z, lamda_inv=0.5)
    assert out.loss.isfinite() or out.loss.isnan()  # accepted; the value is outside the series' region


def test_mec_loss_passes_order_and_check_finite_to_both_pairs():
    p1, z1 = views(8, 10, seed=20)
    p2, z2 = views(8, 10, seed=21)
    lamda_inv = 1 / lamda_for(z2, p1, 0.7)  # ||C|| inside (0, 1), where orders 2 and 4 differ visibly
    out = MECLoss(order=2, warn_on_divergence=False)(p1, z1, p2, z2, lamda_inv=lamda_inv)
    loss2, loss4 = official_loss(p1, z1, p2, z2, lamda_inv, order=2)[0], official_loss(p1, z1, p2, z2, lamda_inv)[0]
    assert abs(float(loss2 - loss4)) > 1e-3 * abs(float(loss4))
    torch.testing.assert_close(out.loss, loss2, rtol=1e-12, atol=1e-15)
    nan = torch.full_like(p1, math.nan)
    for bad in ((nan, z1, p2, z2), (p1, z1, nan, z2)):  # a NaN in the first pair, then in the second
        with pytest.raises(ValueError, match="non-finite"):
            MECLoss(warn_on_divergence=False)(*bad)  # checked by default
        assert MECLoss(check_finite=False, power_iterations=0)(*bad).loss.isnan()


def test_power_iterations_zero_disables_the_estimate_and_one_runs_it():
    p1, z1 = views(16, 8, seed=22)
    p2, z2 = views(16, 8, seed=23)
    assert MECLoss(power_iterations=0)(p1, z1, p2, z2).spectral_norm.isnan()
    true = max(float(torch.linalg.matrix_norm(unit(a) @ unit(b).T, ord=2)) for a, b in ((z2, p1), (z1, p2)))
    estimate = float(MECLoss(power_iterations=1, warn_on_divergence=False)(p1, z1, p2, z2, lamda_inv=1.0).spectral_norm)
    assert 0.5 * true < estimate <= true * (1 + 1e-9)


def test_the_norm_estimate_continues_from_call_to_call():
    """With one iteration per pair and call, the estimate reaches the true norm only by carrying the vector over."""
    g = torch.Generator().manual_seed(24)
    z = torch.randn(64, 64, generator=g, dtype=torch.float64)  # iid rows: a flat spectrum, slow convergence
    p = z + 0.3 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    true = float(torch.linalg.matrix_norm(unit(z) @ unit(p).T, ord=2))
    criterion = MECLoss(power_iterations=1, warn_on_divergence=False)
    first = float(criterion(p, z, p, z, lamda_inv=1.0).spectral_norm)  # both pairs (z, p): 2 iterations
    assert first < 0.995 * true
    for _ in range(60):
        last = float(criterion(p, z, p, z, lamda_inv=1.0).spectral_norm)
    assert abs(last / true - 1) < 1e-3


def test_no_divergence_warning_when_disabled_skipped_or_exact(monkeypatch):
    p1, z1 = views(16, 8, seed=10, noise=0.1)
    p2, z2 = views(16, 8, seed=11, noise=0.1)  # lamda_inv=4: ||C|| ~ 4, the order-4 series diverges
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for criterion, kwargs in (
            (MECLoss(warn_on_divergence=False), {}),
            (MECLoss(), {"estimate_norm": False}),
            (MECLoss(order=None), {}),  # the log-determinant has no convergence region
        ):
            monkeypatch.setattr(loss_module, "_divergence_warned", False)
            criterion(p1, z1, p2, z2, lamda_inv=4.0, **kwargs)


def test_a_norm_of_exactly_one_is_divergent(monkeypatch):
    monkeypatch.setattr(loss_module, "_divergence_warned", False)
    with pytest.warns(RuntimeWarning, match=">= 1"):
        assert loss_module.warn_if_not_converging(1.0) is True
    assert loss_module.warn_if_not_converging(0.999) is False
    assert loss_module.warn_if_not_converging(5.0, order=None) is False


def test_refusals_name_the_input_and_the_empty_case():
    z, lst = views(4, 6)[0], [[0.0] * 6] * 4
    with pytest.raises(TypeError, match=r"z1 must be a torch\.Tensor, not list"):
        coding_length(lst, z, 0.1)
    with pytest.raises(TypeError, match=r"z2 must be a torch\.Tensor, not list"):
        coding_length(z, lst, 0.1)
    with pytest.raises(ValueError, match=r"empty inputs of shape \(0, 6\)"):
        coding_length(z[:0], z[:0], 0.1)
    one = torch.ones(1, 1, dtype=torch.float64)  # a single 1-D embedding: C = [lamda]
    want = torch.tensor(math.log(1.5), dtype=torch.float64)
    torch.testing.assert_close(coding_length(one, one, 0.5, order=None), want)
    with pytest.raises(ValueError, match=r"z1 is on cpu and z2 on meta"):
        coding_length(z, torch.empty(4, 6, dtype=torch.float64, device="meta"), 0.1)
    for order in (True, 2.5):
        with pytest.raises(ValueError, match="order must be a positive int or None"):
            coding_length(z, z, 0.1, order=order)
    for name in ("p1", "z1", "p2"):
        tensors = dict(zip(("p1", "z1", "p2", "z2"), views(4, 6) + views(4, 6, seed=1), strict=True))
        tensors[name] = tensors[name][0]  # 1-D
        with pytest.raises(ValueError, match=f"{name} must be"):
            MECLoss()(**tensors)


def test_exact_form_is_nan_below_zero_determinant_while_a_series_overflow_raises():
    z = torch.ones(1, 3, dtype=torch.float64)
    # C = -2 (1x1): det(I + C) = -1 has no real log; documented NaN, not an error
    assert coding_length(z, -z, 2.0, order=None).isnan()
    with pytest.raises(ValueError, match=r"the series overflowed to (inf|-inf|nan); lamda is far too large"):
        coding_length(z, z, 1e100, order=4)  # C^4 = 1e400 overflows float64


@pytest.mark.parametrize(
    ("m", "d", "gram", "side"),
    [(6, 9, "auto", 6), (9, 6, "auto", 6), (9, 6, "samples", 9), (6, 9, "features", 9), (6, 6, "auto", 6)],
)
def test_auto_picks_the_smaller_gram_matrix(m, d, gram, side):
    """The series' saved powers (what backward keeps in memory) are side x side."""
    z1, z2 = views(m, d, seed=3)
    value = coding_length(z1.requires_grad_(), z2, 0.05, gram=gram)
    assert [tuple(t.shape) for t in value.grad_fn.saved_tensors[4:]] == [(side, side), (side, side)]

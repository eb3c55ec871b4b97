"""The Maximum Entropy Coding loss (Liu et al., "Self-Supervised Learning via Maximum Entropy Coding", NeurIPS 2022).

For row-normalised embeddings ``z1, z2`` (m x d) the coding length of a batch is
``mu * logdet(I_m + lamda * z1 z2^T)``, ``mu = (m + d) / 2``, ``lamda = d / (m * eps^2)``. The paper
trains on its order-4 Taylor form ``tr(sum_k (-1)^(k+1) / k * C^k)``, ``C = lamda * z1 z2^T``.

Two identities make this cheap:

* ``tr((A B^T)^k) = tr((B^T A)^k)``: the series (and, by Sylvester, the determinant) can be
  computed on the ``m x m`` or the ``d x d`` matrix, whichever is smaller;
* ``tr(X Y) = sum(X * Y^T)``: the trace of ``M^(a+b)`` needs ``M^a`` and ``M^b`` only, so order 4
  needs one ``n x n`` product beyond the Gram matrix (the plain series needs three), and the
  gradient ``sum_k (-1)^(k+1) (M^(k-1))^T`` (``(I - M)(I + M^2)`` for order 4) one more.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

GRAM_SIDES = ("auto", "samples", "features")
PAPER_EPS2 = 64.0
PAPER_ORDER = 4
_NORM_EPS = 1e-12  # as F.normalize

_divergence_warned = False


# --------------------------------------------------------------------------------------------
# coding_length


def _check_inputs(z1: Tensor, z2: Tensor) -> None:
    for name, z in (("z1", z1), ("z2", z2)):
        if not isinstance(z, Tensor):
            raise TypeError(f"coding_length: {name} must be a torch.Tensor, not {type(z).__name__}")
        if z.ndim != 2:
            raise ValueError(f"coding_length: {name} must be 2-D (batch, dim), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"coding_length: {name} must be a floating-point tensor, got {z.dtype}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"coding_length: z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.numel() == 0:
        raise ValueError(f"coding_length: empty inputs of shape {tuple(z1.shape)}")
    if z1.device != z2.device:
        raise ValueError(f"coding_length: z1 is on {z1.device} and z2 on {z2.device}")


def _check_finite(value: Tensor, z1: Tensor, z2: Tensor, *, exact: bool) -> None:
    """Checks the 0-d result (one cheap sync) and looks at the inputs only when it is not finite."""
    if bool(torch.isfinite(value)):
        return
    for name, z in (("z1", z1), ("z2", z2)):
        if not bool(torch.isfinite(z).all()):
            raise ValueError(
                f"coding_length: {name} holds non-finite values (NaN or inf); the network diverged or "
                "overflowed upstream of the loss"
            )
    if not exact:  # the exact form is NaN, as documented, when det(I + C) <= 0
        raise ValueError(f"coding_length: the series overflowed to {float(value)}; lamda is far too large")


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """The loss is computed in float32 or float64 even inside an autocast region."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _gram(a: Tensor, b: Tensor, lamda: float, side: str) -> Tensor:
    """``lamda * a b^T`` (m x m, side "samples") or ``lamda * b^T a`` (d x d, side "features")."""
    return (a @ b.mT if side == "samples" else b.mT @ a).mul_(lamda)


def _trace_series(powers: list[Tensor], order: int) -> Tensor:
    """``sum_{k<=order} (-1)^(k+1)/k tr(M^k)`` given ``powers = [M, M^2, ..., M^h]``, ``h >= order/2``.

    ``tr(M^a M^b) = <M^a, (M^b)^T>``; the transposes are made contiguous once each, since a
    strided elementwise product is several times slower than a transposed copy plus a dot.
    """
    h = len(powers)
    transposed: dict[int, Tensor] = {}

    def flat_transpose(j: int) -> Tensor:
        if j not in transposed:
            transposed[j] = powers[j].mT.contiguous().view(-1)
        return transposed[j]

    total = powers[0].new_zeros(())
    for k in range(1, order + 1):
        if k <= h:
            trace = powers[k - 1].diagonal().sum()
        else:
            trace = torch.dot(powers[h - 1].reshape(-1), flat_transpose(k - h - 1))
        total = total + trace * ((-1) ** (k + 1) / k)
    return total


def _polynomial(coefficients: list[float], powers: list[Tensor]) -> Tensor:
    """``c0 I + c1 M + c2 M^2 + ...`` from precomputed powers (no matrix product)."""
    out = torch.zeros_like(powers[0]) if len(coefficients) == 1 else powers[0] * coefficients[1]
    for j in range(2, len(coefficients)):
        out.add_(powers[j - 1], alpha=coefficients[j])
    out.diagonal().add_(coefficients[0])
    return out


def _series_derivative(powers: list[Tensor], order: int) -> Tensor:
    """``P(M) = sum_{j<order} (-M)^j``, so that d(series)/dM = ``P(M)^T``, with one matrix product.

    Split ``P = A + M^h B`` where A and B have degree < h and are sums of the known powers.
    """
    h = len(powers)
    coefficients = [(-1.0) ** j for j in range(order)]
    low, high = coefficients[:h], coefficients[h:]
    result = _polynomial(low, powers)
    if len(high) == 1:
        result.add_(powers[h - 1], alpha=high[0])
    elif high:
        result.add_(powers[h - 1] @ _polynomial(high, powers))
    return result


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to unit L2 norm, and the norms (clamped like ``F.normalize``)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_NORM_EPS)
    return x / norms, norms


def _through_unit_rows(grad: Tensor, unit: Tensor, norms: Tensor) -> Tensor:
    """Chain rule through ``x -> x / ||x||``: ``(g - (g . u) u) / ||x||``, in place on ``grad``."""
    radial = (grad * unit).sum(dim=1, keepdim=True)
    return grad.div_(norms).addcmul_(unit, radial.div_(norms), value=-1.0)


class _TaylorCodingLength(torch.autograd.Function):
    """Forward and backward of the truncated series with the fewest matrix products.

    The row normalisation is done here too: its hand-written backward takes two passes over
    each input where autograd's takes about six, which matters next to the small d x d products.
    """

    @staticmethod
    def forward(ctx, z1: Tensor, z2: Tensor, lamda: float, order: int, side: str, normalize: bool) -> Tensor:  # type: ignore[override]
        with _full_precision(z1.device):
            if normalize:
                (a, norms_a), (b, norms_b) = _unit_rows(z1), _unit_rows(z2)
            else:
                a, b, norms_a, norms_b = z1, z2, None, None
            powers = [_gram(a, b, lamda, side)]
            for _ in range(math.ceil(order / 2) - 1):
                powers.append(powers[-1] @ powers[0])
            value = _trace_series(powers, order)
        ctx.save_for_backward(a, b, norms_a, norms_b, *powers)
        ctx.lamda, ctx.order, ctx.side = lamda, order, side
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, b, norms_a, norms_b, *powers = ctx.saved_tensors
        with _full_precision(a.device):
            scaled = _series_derivative(powers, ctx.order).mul_(grad_output * ctx.lamda)
            grad_a = grad_b = None
            if ctx.side == "samples":  # M = lamda a b^T, dM = P^T
                if ctx.needs_input_grad[0]:
                    grad_a = scaled.mT @ b
                if ctx.needs_input_grad[1]:
                    grad_b = scaled @ a
            else:  # M = lamda b^T a
                if ctx.needs_input_grad[0]:
                    grad_a = b @ scaled.mT
                if ctx.needs_input_grad[1]:
                    grad_b = a @ scaled
            if norms_a is not None:
                grad_a = None if grad_a is None else _through_unit_rows(grad_a, a, norms_a)
                grad_b = None if grad_b is None else _through_unit_rows(grad_b, b, norms_b)
        return grad_a, grad_b, None, None, None, None


def _exact_logdet(a: Tensor, b: Tensor, lamda: float, side: str) -> Tensor:
    n = a.shape[0] if side == "samples" else a.shape[1]
    identity = torch.eye(n, dtype=a.dtype, device=a.device)
    sign, logabsdet = torch.linalg.slogdet(identity + _gram(a, b, lamda, side))
    # det(I + C) is positive while ||C|| < 1; a non-positive one has no real log.
    return torch.where(sign > 0, logabsdet, torch.full_like(logabsdet, math.nan))


def coding_length(
    z1: Tensor,
    z2: Tensor,
    lamda: float,
    order: int | None = PAPER_ORDER,
    *,
    normalize: bool = True,
    gram: str = "auto",
    check_finite: bool = True,
) -> Tensor:
    """``tr(sum_{k=1..order} (-1)^(k+1)/k * (lamda * z1 z2^T)^k)``, or ``logdet(I + lamda * z1 z2^T)``.

    Args:
        z1, z2: ``(m, d)`` embeddings of two views; rows are L2-normalised here unless
            ``normalize=False`` (then they must already be).
        lamda: the scale ``d / (m * eps^2)`` (or its warmed-up value), > 0.
        order: Taylor order (>= 1; the paper uses 4), or ``None`` for the exact log-determinant
            (via ``slogdet``; NaN when ``det(I + C) <= 0``, which only happens far outside the
            series' convergence region).
        normalize: L2-normalise the rows first.
        gram: ``"samples"`` computes on the m x m matrix, ``"features"`` on the d x d one,
            ``"auto"`` picks the smaller. The values are equal up to rounding.
        check_finite: raise ``ValueError`` when the result is not finite because the inputs
            hold NaN/inf (or the series overflowed). Costs one device sync on GPU.

    Returns:
        A 0-d tensor, float32 for half/bfloat16/float32 inputs (autocast is disabled inside),
        float64 for float64 inputs. Differentiable w.r.t. both inputs.

    Shapes: z1, z2 ``(m, d)`` -> ``()``.
    """
    _check_inputs(z1, z2)
    if not (isinstance(lamda, int | float) and math.isfinite(lamda) and lamda > 0):
        raise ValueError(f"coding_length: lamda must be a positive finite number, got {lamda!r}")
    if order is not None and (not isinstance(order, int) or isinstance(order, bool) or order < 1):
        raise ValueError(f"coding_length: order must be a positive int or None (exact logdet), got {order!r}")
    if gram not in GRAM_SIDES:
        raise ValueError(f"coding_length: gram must be one of {GRAM_SIDES}, got {gram!r}")
    m, d = z1.shape
    side = gram if gram != "auto" else ("samples" if m <= d else "features")
    dtype = torch.promote_types(torch.promote_types(z1.dtype, z2.dtype), torch.float32)
    with _full_precision(z1.device):
        a, b = z1.to(dtype), z2.to(dtype)
        if order is None:
            if normalize:
                a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            value = _exact_logdet(a, b, float(lamda), side)
        else:
            value = _TaylorCodingLength.apply(a, b, float(lamda), order, side, normalize)
    if check_finite:
        _check_finite(value, z1, z2, exact=order is None)
    return value


# --------------------------------------------------------------------------------------------
# convergence check


class SpectralEstimate(NamedTuple):
    value: Tensor
    """0-d tensor: the estimate of ``||C||_2``, a lower bound."""
    vector: Tensor
    """Unit ``(d,)`` vector, the estimated top eigenvector in feature space; pass it as ``start`` next time."""


@functools.lru_cache(maxsize=8)
def _start_vector(d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=generator, dtype=torch.float64)
    return (v / v.norm()).to(device=device, dtype=dtype)


@torch.no_grad()
def spectral_norm_estimate(
    z1: Tensor,
    z2: Tensor,
    lamda: float,
    iterations: int = 10,
    *,
    normalize: bool = True,
    start: Tensor | None = None,
) -> SpectralEstimate:
    """Power-iteration estimate (from below) of ``||C||_2``, ``C = lamda * a b^T``, ``a, b`` the L2-normalised rows.

    Iterates in feature space on ``(a^T a)(b^T b)``, whose eigenvalues are the squared singular
    values of ``a b^T``, using matrix-vector products with the ``(m, d)`` inputs only (4 per
    iteration, O(m d) each; the row norms enter as length-m scalings); C is never formed. The
    feature-space vector carries over from one batch to the next (``start``), where a
    sample-space one would not, so that a few iterations per step track the norm closely even
    when the spectrum is flat. No device sync.
    """
    a, b = z1.detach(), z2.detach()
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    if normalize:
        scale_a = torch.linalg.vector_norm(a, dim=1).clamp_min_(_NORM_EPS).pow_(-2)
        scale_b = torch.linalg.vector_norm(b, dim=1).clamp_min_(_NORM_EPS).pow_(-2)
    else:
        scale_a = scale_b = torch.ones(a.shape[0], dtype=dtype, device=a.device)
    w = _start_vector(a.shape[1], a.device, dtype) if start is None else start.to(device=a.device, dtype=dtype)
    for _ in range(iterations):
        w = a.mT @ (scale_a * (a @ (b.mT @ (scale_b * (b @ w)))))
        w = w / torch.linalg.vector_norm(w).clamp_min(torch.finfo(dtype).tiny)
    # Rayleigh quotient in sample space: v = b' w is the matching right singular vector of a' b'^T.
    v = scale_b.sqrt() * (b @ w)
    cv = scale_a.sqrt() * (a @ (b.mT @ (scale_b.sqrt() * v)))
    value = torch.linalg.vector_norm(cv) / torch.linalg.vector_norm(v).clamp_min(torch.finfo(dtype).tiny) * lamda
    return SpectralEstimate(value, w)


def warn_if_not_converging(spectral_norm: float, *, order: int | None = PAPER_ORDER, context: str = "") -> bool:
    """Warn (once per process) when ``||C||_2 >= 1``: the Taylor series then no longer converges.

    Returns whether the value is in the divergent region. ``context`` (e.g. " at step 120")
    is appended to the value in the message.
    """
    global _divergence_warned
    diverging = order is not None and not spectral_norm < 1.0
    if diverging and not _divergence_warned:
        _divergence_warned = True
        warnings.warn(
            f"MEC: the spectral norm of C = lamda * z1 z2^T is estimated at {spectral_norm:.4g}{context}, "
            f">= 1: the order-{order} Taylor series of logdet(I + C) does not converge there, so the loss is "
            "no longer the coding length. Use a larger 1/lamda (longer lamda warm-up or larger eps^2) "
            "or the exact log-determinant (order=None). This warning is shown once.",
            RuntimeWarning,
            stacklevel=2,
        )
    return diverging


# --------------------------------------------------------------------------------------------
# MECLoss


class MECLossOutput(NamedTuple):
    loss: Tensor
    """Training loss to minimise: ``-(tr_1 + tr_2) / 2 / m * lamda_inv`` (the official scale)."""
    coding_length: Tensor
    """Per-sample coding length ``mu * (tr_1 + tr_2) / 2 / m`` (Eqn. 2), detached."""
    spectral_norm: Tensor
    """Estimate of ``max ||C||_2`` over the two pairs, detached; the series needs it below 1."""


class _GatherWithGrad(torch.autograd.Function):
    """Synchronous all-gather with gradient: no collective is left running on a backend thread."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())  # blocking: returns when the rows are here
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)  # blocking; the sum over ranks of this slice's gradient
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' rows, in rank order; the backward sums each slice's gradient over ranks and returns it.

    Synchronous on purpose: the functional collectives (``all_gather_single_autograd``) run on the
    gloo worker threads while the caller computes, and under gloo on CPU (torch 2.14.1) that
    corrupted the heap now and then (issue 21 item 17).
    """
    return _GatherWithGrad.apply(x)


class MECLoss(nn.Module):
    """Maximum Entropy Coding loss from "Self-Supervised Learning via Maximum Entropy Coding".

    Liu, Wang, Li, Gao, Yuan, Tian, Yang. NeurIPS 2022. https://arxiv.org/abs/2210.11464

    The symmetric loss of the official recipe: the student's predictions of one view are coded
    against the EMA teacher's embeddings of the other view, ``(p1, z2)`` and ``(p2, z1)``. With
    ``m`` the (global) batch size and ``d`` the embedding size, ``lamda = d / (m * eps2)`` and
    ``mu = (m + d) / 2``::

        mec  = (coding_length(z2, p1) + coding_length(z1, p2)) / 2 / m
        loss = -mec * lamda_inv       # what is minimised (the scale the official lr is tuned for)
        coding_length = mec * mu     # per-sample coding length, for logging

    Args:
        eps2: squared distortion ``eps^2`` (paper: 64).
        order: Taylor order (paper: 4), or ``None`` for the exact log-determinant.
        gather_distributed: gather the inputs of all ranks (with gradients) before computing the
            loss, so that ``m`` is the global batch. Needs an initialised ``torch.distributed``.
        power_iterations: iterations of the spectral-norm estimate per pair (0 disables it). Each
            call continues from the previous call's vector (kept in ``state_dict()``), so a few
            iterations per call track the norm well; ``forward(..., estimate_norm=False)`` skips
            the estimate for one call (a loop that logs every N steps needs it only then).
        warn_on_divergence: warn once when the estimate reaches 1 (syncs with the device each
            call; a training loop that logs the returned estimate can check it itself with
            ``warn_if_not_converging`` instead).
        check_finite: raise on a non-finite loss caused by NaN/inf inputs (a device sync per
            call on GPU; a training loop that checks the loss it logs can turn it off).

    Shapes:
        p1, z1, p2, z2: ``(n, d)`` each, where ``n`` is the per-rank batch; outputs are 0-d.

    Example::

        criterion = MECLoss()
        p1, p2 = predictor(student(x1)), predictor(student(x2))
        with torch.no_grad():
            z1, z2 = teacher(x1), teacher(x2)
        out = criterion(p1, z1, p2, z2, lamda_inv=lamda_inv_schedule[step])
        out.loss.backward()
    """

    def __init__(
        self,
        eps2: float = PAPER_EPS2,
        order: int | None = PAPER_ORDER,
        *,
        gather_distributed: bool = False,
        power_iterations: int = 5,
        warn_on_divergence: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not (math.isfinite(eps2) and eps2 > 0):
            raise ValueError(f"MECLoss: eps2 must be positive, got {eps2!r}")
        if order is not None and (not isinstance(order, int) or order < 1):
            raise ValueError(f"MECLoss: order must be a positive int or None, got {order!r}")
        if gather_distributed and not torch.distributed.is_available():
            raise ValueError("MECLoss: gather_distributed=True but torch.distributed is not available in this build")
        self.eps2 = float(eps2)
        self.order = order
        self.gather_distributed = gather_distributed
        self.power_iterations = power_iterations
        self.warn_on_divergence = warn_on_divergence
        self.check_finite = check_finite
        # Feature-space start of the next spectral-norm estimate (see spectral_norm_estimate).
        self._spectral_vector: Tensor | None = None

    def get_extra_state(self) -> dict[str, Tensor | None]:
        return {"spectral_vector": self._spectral_vector}

    def set_extra_state(self, state: dict[str, Tensor | None]) -> None:
        self._spectral_vector = state.get("spectral_vector")

    def lamda(self, m: int, d: int) -> float:
        """The paper's ``lamda = d / (m * eps^2)`` for a global batch ``m`` and embedding size ``d``."""
        return d / (m * self.eps2)

    def _gather(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if not self.gather_distributed:
            return tensors
        if not torch.distributed.is_initialized():
            raise ValueError(
                "MECLoss: gather_distributed=True but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first or pass gather_distributed=False"
            )
        if torch.distributed.get_world_size() == 1:
            return tensors
        return tuple(_gather_with_grad(t) for t in tensors)

    def forward(
        self,
        p1: Tensor,
        z1: Tensor,
        p2: Tensor,
        z2: Tensor,
        lamda_inv: float | None = None,
        *,
        estimate_norm: bool = True,
    ) -> MECLossOutput:
        """``p_i``: predictor(student(view i)); ``z_i``: teacher(view i); ``lamda_inv``: ``1/lamda``.

        ``lamda_inv=None`` uses the paper's value ``m * eps2 / d`` (no warm-up). With
        ``estimate_norm=False`` the returned ``spectral_norm`` is NaN and no warning is checked.
        """
        for name, t in (("p1", p1), ("z1", z1), ("p2", p2), ("z2", z2)):
            if t.ndim != 2 or t.shape != p1.shape:
                raise ValueError(
                    f"MECLoss: {name} must be (batch, dim) like p1 {tuple(p1.shape)}, got {tuple(t.shape)}"
                )
        p1, z1, p2, z2 = self._gather(p1, z1, p2, z2)
        m, d = p1.shape
        if lamda_inv is None:
            lamda_inv = 1.0 / self.lamda(m, d)
        if not (math.isfinite(lamda_inv) and lamda_inv > 0):
            raise ValueError(f"MECLoss: lamda_inv must be positive, got {lamda_inv!r}")
        lamda = 1.0 / lamda_inv
        kwargs = {"order": self.order, "check_finite": self.check_finite}
        traces = coding_length(z2, p1, lamda, **kwargs) + coding_length(z1, p2, lamda, **kwargs)
        mec = traces * (0.5 / m)
        loss = -mec * lamda_inv
        coding = mec.detach() * ((m + d) / 2)
        estimate_norm = estimate_norm and self.power_iterations > 0
        if estimate_norm:
            first = spectral_norm_estimate(z2, p1, lamda, self.power_iterations, start=self._spectral_vector)
            second = spectral_norm_estimate(z1, p2, lamda, self.power_iterations, start=first.vector)
            self._spectral_vector = second.vector
            spectral = torch.maximum(first.value, second.value)
        else:
            spectral = torch.full((), math.nan, device=p1.device)
        if self.warn_on_divergence and estimate_norm:
            warn_if_not_converging(float(spectral), order=self.order)
        return MECLossOutput(loss, coding, spectral)

    def extra_repr(self) -> str:
        return f"eps2={self.eps2}, order={self.order}, gather_distributed={self.gather_distributed}"

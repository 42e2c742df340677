"""The parity rule, shared by the test suite, the benchmarks and the GPU suite.

A fast kernel is compared with the reference implementation on the same inputs, for every output and every input
gradient, per tensor (flash-attention's test suite):

    max|fast - oracle| <= 2 * max|ref - oracle| + atol (+ a documented, op-specific slack)

- ``oracle``: the reference run one precision up on the same (upcast) inputs, ``oracle_dtype(dtype)``: float32 for
  float16 / bfloat16 results, float64 for float32 ones;
- ``ref``: the reference run in the result's own precision: its distance from the oracle is the error that precision
  costs *on these inputs*. That is how the rule accounts for conditioning: inputs that amplify rounding (large
  scores, long reductions, cancellation) raise the reference's error and the bound with it, well-conditioned inputs
  keep it tight. A fixed tolerance cannot do both: 1e-5 is too tight where inputs amplify rounding and too loose
  where they do not;
- ``atol`` (:func:`parity_atol`): a floor for tensors on which the reference happens to be exact. float32: a few
  rounding steps at the size of the result; float16 / bfloat16: a fixed ``ATOL``;
- the slacks, each with its derivation: :func:`float32_angle_error` (sinusoid / rotary kernels computing angles in
  float32) and :func:`attention_backward_slack` (what a flash-style attention backward pass rounds that the
  reference's autograd does not).

:func:`assert_parity` checks one tensor; :func:`check_against_reference` runs a function and the reference on the
same inputs and checks every output and input gradient. A result is never its own yardstick: a check without a
reference run (``ref=None``) falls back to a fixed tolerance, and no test compares the reference with itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

_HALF = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------------- constants

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
"""Unit roundoff ``u`` per dtype: one correctly rounded operation has relative error at most ``u``."""

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
"""Fixed absolute tolerances.

float16 / bfloat16: the rule's floor, about two rounding steps of a unit-size value (2 * 2**-10 and 2 * 2**-7,
rounded up); with the reference's low-precision error already in the bound, the floor only matters where that error
is 0, on small or exactly representable results.

float32 / float64: used only by checks without a reference run (``assert_parity(..., ref=None)``), elementwise with
``RTOL``: 1e-5 is ~170 float32 rounding steps of a unit-size value, room for reordered sums of a few thousand
unit-size terms. It cannot see conditioning; checks that have the reference's own result use :func:`parity_atol`."""

RTOL = {torch.float64: 1e-8, torch.float32: 1e-5, torch.float16: 0.0, torch.bfloat16: 0.0}
"""Relative part of the fixed float32 / float64 tolerance of checks without a reference run (see ``ATOL``)."""

FLOAT32_ATOL_ULPS = 16
"""The float32 floor, in unit roundoffs (``2**-24``) of the largest oracle value. Kernels reorder sums (online
softmax, blocked and split reductions), so where the reference happens to be nearly exact they may still be off by
a few roundings of the largest intermediate, which for these ops is about the size of the largest result. Measured
excess over twice the reference's error: at most 1.7 such roundings over the property suite (3414 float32 checks of
the ci profile with either OpenBLAS kernel choice, 1316 of 150 dev-profile examples per op). 16 leaves ~10x margin
and still resolves a 1e-6 relative error; the old fixed 1e-5 was 168 roundings at size 1 and a 1% error at size
1e-3."""


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the parity oracle for results in ``dtype``: float32 for float16 / bfloat16, float64 for
    float32 (and float64, which has nothing higher)."""
    return torch.float32 if dtype in _HALF else torch.float64


def float32_angle_error(last_position: int) -> float:
    """Bound, in radians, on the angle error of float32 sinusoid / rotary kernels at positions up to
    ``last_position``: the inverse frequency is rounded once from float64 and ``pos * inv_freq`` once more, each a
    relative error of 2**-24, so at most ``2 * pos * 2**-24``. The reference tables are exact (float64, rounded
    once), so this is the slack those kernels get on top of the rule, times the amplitude of what is rotated: 1 for
    the sinusoid (times the dropout scale), ``|x1| + |x2|`` for rotary.

    The package's own kernels (C++, CUDA and Triton) now form and reduce the angle in float64 and stay within ~3e-7
    at any position (``tests/test_precision.py`` holds Triton's within 1e-5 at offset 100000); the bound remains for
    code that computes its angles in float32 (``optimize``'s probe of third-party positional-encoding tables)."""
    return 2 * max(last_position, 1) * 2**-24


# ----------------------------------------------------------------------------------------------------- the rule


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, compared in float64; NaNs in the same places count as equal."""
    a, b = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def _magnitude(t: torch.Tensor) -> float:
    finite = t.detach().double().abs().nan_to_num(0.0, posinf=0.0)
    return float(finite.max()) if finite.numel() else 0.0


def parity_atol(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """The rule's floor for a result computed in ``dtype``: ``FLOAT32_ATOL_ULPS`` rounding steps of the largest
    finite oracle value for float32, ``ATOL[dtype]`` otherwise (float64 has no more precise oracle to measure the
    reference against, so its checks use the fixed tolerance)."""
    if dtype == torch.float32:
        return FLOAT32_ATOL_ULPS * UNIT_ROUNDOFF[torch.float32] * _magnitude(oracle)
    return ATOL[dtype]


def rule_bound(ref_error: float, atol: float, extra: float = 0.0) -> float:
    """The rule on measured numbers: ``2 * ref_error + atol + extra``, the largest ``max|fast - oracle|`` accepted
    when the reference is ``ref_error`` from the oracle."""
    return 2 * ref_error + atol + extra


def parity_bound(
    ref: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, *, extra: float = 0.0, atol: float | None = None
) -> float:
    """:func:`rule_bound` for the reference result ``ref`` against ``oracle``, for a result computed in ``dtype``;
    ``atol`` defaults to :func:`parity_atol`, ``extra`` is a documented slack."""
    return rule_bound(max_error(ref, oracle), parity_atol(oracle, dtype) if atol is None else atol, extra)


def _is_reference_run(fast, ref, oracle) -> bool:
    """Whether ``ref`` is a reference result that can be measured against ``oracle``: not missing, not the result
    under test or the oracle itself, and ``oracle`` more precise than ``fast``."""
    if ref is None or ref is fast or ref is oracle:
        return False
    return fast.dtype in _HALF or torch.finfo(oracle.dtype).bits > torch.finfo(fast.dtype).bits


def assert_parity(
    fast: torch.Tensor,
    ref: torch.Tensor | None,
    oracle: torch.Tensor,
    *,
    name: str = "output",
    atol: float | None = None,
    extra: float = 0.0,
    dtype: torch.dtype | None = None,
) -> float:
    """Asserts the parity rule for one result; returns ``max|fast - oracle|``.

    ``ref``: the reference's result in the precision ``fast`` was computed in, on the same inputs; ``oracle``: the
    reference one precision up (``oracle_dtype``). ``extra``: a documented slack added to the bound; ``atol``
    replaces the floor. ``dtype``: the precision of the computation when the result is stored wider (a float32 loss
    of a bfloat16 autocast run); defaults to ``fast.dtype``.

    Without a reference run (``ref`` None, or ``fast`` or ``oracle`` passed in its place, or an oracle no more
    precise than ``fast``) there is no error to measure: float32 / float64 results are held to the fixed elementwise
    ``ATOL`` + ``RTOL`` (or ``atol``) plus ``extra``, half precisions to the floor plus ``extra``.
    """
    if fast.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(oracle.shape)}")
    dtype = fast.dtype if dtype is None else dtype
    err = max_error(fast, oracle)
    if not _is_reference_run(fast, ref, oracle):
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(
                fast.to(oracle.dtype),
                oracle,
                atol=(ATOL[dtype] if atol is None else atol) + extra,
                rtol=RTOL[dtype],
                equal_nan=True,
                msg=lambda m: f"{name} (no reference run, fixed tolerance): {m}",
            )
            return err
        bound = (ATOL[dtype] if atol is None else atol) + extra
        if not err <= bound:
            raise AssertionError(f"{name} ({dtype}, no reference run): max|fast - oracle| = {err:.3e} > {bound:.3e}")
        return err
    if ref.shape != oracle.shape:
        raise AssertionError(f"{name}: reference shape {tuple(ref.shape)} != oracle {tuple(oracle.shape)}")
    ref_err = max_error(ref, oracle)
    floor = parity_atol(oracle, dtype) if atol is None else atol
    bound = rule_bound(ref_err, floor, extra)
    if not err <= bound:  # also fails on a NaN error
        raise AssertionError(
            f"{name} ({dtype}): max|fast - oracle| = {err:.3e} > bound {bound:.3e} "
            f"= 2 x the reference's {ref_err:.3e} + atol {floor:.3e} + slack {extra:.3e}"
        )
    return err


def assert_all_parity(
    fast_outs: Sequence[torch.Tensor],
    ref_outs: Sequence[torch.Tensor | None],
    oracle_outs: Sequence[torch.Tensor],
    names: Sequence[str],
    extras: Sequence[float] | None = None,
) -> list[float]:
    """:func:`assert_parity` for each of ``names``: the fast result, the reference's in the same precision (``None``
    where there is none) and the oracle's; ``extras``: a slack per tensor. Returns the errors."""
    extras = [0.0] * len(names) if extras is None else extras
    errors = []
    for name, fast, ref, oracle, extra in zip(names, fast_outs, ref_outs, oracle_outs, extras, strict=True):
        assert fast is not None, f"{name}: no gradient"
        ref = ref.to(fast.dtype) if ref is not None and ref.dtype != fast.dtype else ref
        errors.append(assert_parity(fast, ref, oracle, name=name, extra=extra))
    return errors


# ------------------------------------------------------------------------------------- running an op both ways


def grad_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies of ``tensors``; the floating-point ones require grad: fresh leaves for one run of an op."""
    leaves = [t.detach().clone() for t in tensors]
    return [t.requires_grad_(True) if t.is_floating_point() else t for t in leaves]


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], device: str = "cpu") -> list[torch.Tensor]:
    """Outputs of ``fn(*inputs)`` and the gradients of the inputs that require grad, for a fixed random upstream
    gradient (seed 7, drawn in float32 on ``device`` and rounded to each output's dtype, so every precision sees the
    same values up to that rounding)."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple | list) else (out,)
    gen = torch.Generator(device=device).manual_seed(7)
    grads_out = [torch.randn(o.shape, generator=gen, device=device).to(o.dtype) for o in outs]
    wrt = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(outs, wrt, grads_out) if wrt else ()
    return [o.detach() for o in outs] + list(grads)


def check_against_reference(
    fast: Callable,
    ref: Callable,
    inputs: Sequence[torch.Tensor],
    names: Sequence[str],
    device: str = "cpu",
    extras: Sequence[float] | None = None,
) -> list[float]:
    """Runs ``fast`` and ``ref`` on ``inputs`` (floating tensors all of one dtype) and ``ref`` once more on them
    upcast to ``oracle_dtype``; asserts the rule for every output and floating input's gradient, named ``names``
    in that order (``extras``: a slack per tensor). Returns the errors."""
    dtype = next(t.dtype for t in inputs if t.is_floating_point())
    up = oracle_dtype(dtype)
    got = outputs_and_grads(fast, grad_leaves(*inputs), device)
    lowp = outputs_and_grads(ref, grad_leaves(*inputs), device)
    exact = outputs_and_grads(ref, grad_leaves(*(t.to(up) if t.is_floating_point() else t for t in inputs)), device)
    return assert_all_parity(got, lowp, exact, names, extras)


# ------------------------------------------------------------------------------------ attention backward slack


def _float32_dot_roundoff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest rounding error of the float32 products ``a @ b^T`` (as the reference computes them), in units of
    ``2**-24 * (|a| @ |b|^T)``, the scale a dot product's rounding error is proportional to; at least 1."""
    exact = a.double() @ b.double().transpose(-2, -1)
    got = (a.float() @ b.float().transpose(-2, -1)).double()
    scale = (a.double().abs() @ b.double().abs().transpose(-2, -1)) * UNIT_ROUNDOFF[torch.float32]
    ratio = ((got - exact).abs() / scale).nan_to_num(0.0, posinf=0.0)
    return max(1.0, float(ratio.max()) if ratio.numel() else 0.0)


def attention_backward_slack(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[float, float, float]:
    """Slack ``(dq, dk, dv)`` for what a flash-style attention backward pass rounds and the reference's autograd
    does not; first-order bounds, 0 where the pass has no such step.

    ``q`` (..., Hq, Nq, D), ``k`` (..., Hk, Nk, D), ``v`` (..., Hk, Nk, Dv) in the computation's dtype, ``out`` the
    oracle's output, ``grad_out`` the upstream gradient; the rest as for the op (``dropout_mask``: the kept
    elements). Hq may be a multiple of Hk (GQA); 3-D inputs are one head.

    Every float32 dot product below is allowed twice the rounding error the reference's own float32 products of
    the same vectors show (:func:`_float32_dot_roundoff`, relative to the sum of the |terms|): the rule's factor,
    measured on these inputs rather than taken at the worst case ``(n + 1) * 2**-24`` (5x looser at n = 16, 30x
    at n = 128).

    1. ``dS = P (dP - Delta)`` with ``dP_ij = dO_i . v_j`` summed in float32 and ``Delta_i = dO_i . O_i`` from the
       *stored* output (one more rounding, to the output dtype), where the reference uses the exact
       ``sum_j P_ij dP_ij``. When the true dS is ~0 (one key, uniform rows, one-hot softmax) these roundings are all
       the error there is, and the reference's own error says nothing about them. They reach ``dq = scale dS k`` and
       ``dk = scale dS^T q``.
    2. The backward recomputes ``P = exp(s - lse)`` from the forward's row statistics. The score ``s = scale q.k``
       is a float32 dot product in the forward (inside lse) and another in the backward, in another summation order
       (K Q^T instead of Q K^T, other tiles: two roundings that need not agree), and the product by the scale and
       ``lse = m + log(l)`` each round at the size of the row's largest score. ``log P`` is off by their sum, so
       ``P`` by that much relative, which reaches ``dv = P^T dO`` and, through ``dS``, dq and dk. Large scores make
       it large: at |s| ~ 3e3 one rounding is 2.4e-4, while the reference's one-hot softmax there is exact.

    The additive mask's own rounding is left out: a kernel keeps a huge finite bias (``finfo.min``) out of the
    stored lse (as the Triton kernel's split lse does); one that does not is wrong, not imprecise.
    """
    if out.numel() == 0 or k.shape[-2] == 0:
        return 0.0, 0.0, 0.0
    dtype = q.dtype
    q, k, v, out, grad_out = (t.detach().double() for t in (q, k, v, out, grad_out))
    if q.dim() == 3:
        q, k, v, out, grad_out = (t.unsqueeze(-3) for t in (q, k, v, out, grad_out))
        attn_mask = attn_mask.unsqueeze(-3) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        dropout_mask = dropout_mask.unsqueeze(-3) if dropout_mask is not None else None
    hq, hk = q.shape[-3], k.shape[-3]
    group = hq // hk
    k, v = (t.repeat_interleave(group, dim=-3) for t in (k, v))
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    u32 = UNIT_ROUNDOFF[torch.float32]

    raw = (q @ k.transpose(-2, -1)) * scale
    scores = raw
    if is_causal:
        causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask.double()
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully-masked rows: 0

    # 1. dS from the float32 dP and the stored output's Delta.
    stored = out.to(dtype).double()
    rho_dp = _float32_dot_roundoff(grad_out, v)
    rho_delta = _float32_dot_roundoff(grad_out.unsqueeze(-2), stored.unsqueeze(-2))
    dp_err = 2 * rho_dp * u32 * (grad_out.abs() @ v.abs().transpose(-2, -1))
    if dropout_mask is not None:
        dp_err = dp_err * dropout_mask.to(dp_err.dtype) / (1.0 - dropout_p)
    delta_err = (UNIT_ROUNDOFF[dtype] + 2 * rho_delta * u32) * (grad_out.abs() * stored.abs()).sum(-1, keepdim=True)
    ds_err = probs * (dp_err + delta_err)

    # 2. P recomputed from the saved row statistics: two score roundings, the scale's and lse's at the row's size.
    rho = _float32_dot_roundoff(q, k)
    dot_abs = (q.abs() @ k.abs().transpose(-2, -1)) * abs(scale)
    visible = torch.isfinite(scores)
    row_max = raw.abs().masked_fill(~visible, 0.0).amax(-1, keepdim=True)
    log_p_err = u32 * (4 * rho * dot_abs + 2 * row_max)
    p_err = probs * log_p_err
    dp = grad_out @ v.transpose(-2, -1)
    if dropout_mask is not None:
        dp = dp * dropout_mask.to(dp.dtype) / (1.0 - dropout_p)
    delta = (grad_out * out).sum(-1, keepdim=True)
    ds_err = ds_err + p_err * (dp - delta).abs()
    p_err = p_err if dropout_mask is None else p_err * dropout_mask.to(p_err.dtype) / (1.0 - dropout_p)

    ds_err = ds_err * abs(scale)
    dq = ds_err @ k.abs()
    dk = ds_err.transpose(-2, -1) @ q.abs()
    dv = p_err.transpose(-2, -1) @ grad_out.abs()
    dk, dv = (t.unflatten(-3, (hk, group)).sum(-3) for t in (dk, dv))
    return tuple(float(t.max()) if t.numel() else 0.0 for t in (dq, dk, dv))

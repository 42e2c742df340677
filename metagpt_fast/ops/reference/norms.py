"""Reference LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019) over the trailing dims, with the optional
residual add before them (pre-LN transformer blocks: ``x = input + residual`` is both normalised and returned, the
sum the next block adds its branch to).

    layer_norm(x) = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (biased variance)
    rms_norm(x)   = x / sqrt(mean(x^2) + eps) * weight

Statistics and the affine map are computed in float32 (float64 for float64 inputs) and the result is rounded once to
the input's dtype, as torch's kernels do. The sum with ``residual`` is rounded to the input's dtype before it is
normalised: it is the tensor the unfused ``norm(input + residual)`` sees.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is normalised in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm(x, dims, weight, bias, eps, rms):
    xf = x.to(compute_dtype(x.dtype))
    if rms:
        y = xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)
    else:
        mean = xf.mean(dims, keepdim=True)
        centred = xf - mean
        y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``input`` (or of ``input + residual``, returned with that sum) over ``normalized_shape``."""
    x = input if residual is None else input + residual
    dims = tuple(range(-len(normalized_shape), 0))
    out = _norm(x, dims, weight, bias, eps, rms=False)
    return out if residual is None else (out, x)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``input`` (or of ``input + residual``, returned with that sum); ``eps`` None is
    ``torch.finfo(input.dtype).eps``, as in ``torch.nn.functional.rms_norm``."""
    x = input if residual is None else input + residual
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    out = _norm(x, dims, weight, None, eps, rms=True)
    return out if residual is None else (out, x)

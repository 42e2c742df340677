"""metagpt_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention: state_dicts, outputs and every gradient."""

import pytest
import torch
from helpers import AVAILABLE_BACKENDS, backend_or_skip
from torch import nn

from metagpt_fast.nn import MultiheadAttention
from metagpt_fast.testing import assert_parity

E, H, B, L, S = 12, 3, 2, 5, 7  # head dim 4; L != S for cross-attention


def make_pair(**kwargs):
    """(torch module in float64, our module in float32) with the same weights."""
    torch_mha = nn.MultiheadAttention(E, H, **kwargs).double()
    with torch.no_grad():
        for p in torch_mha.parameters():  # non-zero biases, so a wrong bias path shows
            p.copy_(torch.randn_like(p) * 0.5)
    ours = MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict({k: v.float() for k, v in torch_mha.state_dict().items()})
    return torch_mha, ours


def inputs(batch_first, kdim=E, vdim=E, self_attention=False, unbatched=False):
    def shape(n, d):
        if unbatched:
            return (n, d)
        return (B, n, d) if batch_first else (n, B, d)

    q = torch.randn(shape(L if not self_attention else S, E), dtype=torch.float64)
    if self_attention:
        return q, q, q
    return q, torch.randn(shape(S, kdim), dtype=torch.float64), torch.randn(shape(S, vdim), dtype=torch.float64)


def run(module, q, k, v, dtype, **kw):
    """Output, weights and gradients (inputs, then parameters in order) for a fixed upstream gradient."""
    leaves = []
    qkv = []
    for t in (q, k, v):
        if any(t is x for x in qkv):  # keep self-attention's aliasing (query is key is value)
            qkv.append(qkv[[x is t for x in qkv].index(True)])
            continue
        t = t.detach().to(dtype).requires_grad_()
        leaves.append(t)
        qkv.append(t)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    module.zero_grad()
    out, weights = module(*qkv, **kw)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(dtype)
    (out * grad_out).sum().backward()
    grads = [t.grad for t in leaves] + [p.grad for p in module.parameters()]
    return out, weights, grads


def check(torch_mha, ours, q, k, v, **kw):
    ref_out, ref_w, ref_grads = run(torch_mha, q, k, v, torch.float64, **kw)
    out, w, grads = run(ours, q, k, v, torch.float32, **kw)
    assert_parity(out, out, ref_out, name="output")
    if ref_w is None:
        assert w is None
    else:
        assert_parity(w, w, ref_w, name="attn_weights")
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_parity(g, g, ref_g, name=f"gradient {i}")


def test_state_dict_interchanges_both_ways():
    for kwargs in ({}, {"kdim": 5, "vdim": 7}, {"add_bias_kv": True, "bias": False}):
        torch_mha = nn.MultiheadAttention(E, H, **kwargs)
        ours = MultiheadAttention(E, H, **kwargs)
        assert list(torch_mha.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(torch_mha.state_dict())
        torch_mha.load_state_dict(ours.state_dict())
        assert isinstance(ours, nn.MultiheadAttention)


def test_from_torch_shares_parameters():
    torch_mha = nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiheadAttention.from_torch(torch_mha, backend="reference")
    assert ours.in_proj_weight is torch_mha.in_proj_weight and ours.out_proj is torch_mha.out_proj
    assert ours.backend == "reference" and ours.batch_first


CONFIGS = {
    "self-seq-first": dict(module={}, self_attention=True),
    "cross-batch-first": dict(module={"batch_first": True}),
    "kdim-vdim": dict(module={"kdim": 5, "vdim": 7}),
    "no-bias": dict(module={"bias": False, "batch_first": True}),
    "bias-kv-zero-attn": dict(module={"add_bias_kv": True, "add_zero_attn": True}),
    "unbatched": dict(module={}, unbatched=True),
}


def masks(kind, tgt_len, unbatched=False):
    """Masks in torch.nn.MultiheadAttention's conventions (bool True = not allowed) for (tgt_len, S) scores."""
    lengths = torch.tensor([S, 3])
    padding = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S), True = padding
    if unbatched:
        padding = padding[1]
    blocked = torch.rand(tgt_len, S) < 0.4
    blocked[:, 0] = False  # every query keeps a key: fully masked rows are tested separately
    if kind == "none":
        return {}
    if kind == "key_padding_bool":
        return {"key_padding_mask": padding}
    if kind == "key_padding_float":
        return {"key_padding_mask": torch.zeros(padding.shape, dtype=torch.float64).masked_fill(padding, -1e9)}
    if kind == "attn_bool":
        return {"attn_mask": blocked}
    if kind == "attn_float_3d":
        return {"attn_mask": torch.randn((1 if unbatched else B) * H, tgt_len, S, dtype=torch.float64)}
    if kind == "both":
        return {"attn_mask": blocked, "key_padding_mask": padding}
    raise AssertionError(kind)


MASKS = ["none", "key_padding_bool", "key_padding_float", "attn_bool", "attn_float_3d", "both"]


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_matches_torch(backend, config, need_weights):
    cfg = CONFIGS[config]
    torch_mha, ours = make_pair(**cfg["module"])
    self_attention, unbatched = cfg.get("self_attention", False), cfg.get("unbatched", False)
    q, k, v = inputs(
        cfg["module"].get("batch_first", False),
        cfg["module"].get("kdim", E),
        cfg["module"].get("vdim", E),
        self_attention,
        unbatched,
    )
    tgt_len = S if self_attention else L
    with backend_or_skip(backend):
        for kind in MASKS:
            check(torch_mha, ours, q, k, v, need_weights=need_weights, **masks(kind, tgt_len, unbatched))
        if need_weights:  # per-head weights
            check(
                torch_mha,
                ours,
                q,
                k,
                v,
                need_weights=True,
                average_attn_weights=False,
                **masks("both", tgt_len, unbatched),
            )


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("with_padding", [False, True])
def test_is_causal_hint(backend, with_padding):
    torch_mha, ours = make_pair(batch_first=True)
    x = torch.randn(B, S, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
    kw = {"attn_mask": causal, "is_causal": True, "need_weights": False}
    if with_padding:
        kw["key_padding_mask"] = torch.tensor([[False] * S, [False] * 4 + [True] * (S - 4)])
    with backend_or_skip(backend):
        check(torch_mha, ours, x, x, x, **kw)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(x.float(), x.float(), x.float(), is_causal=True)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_fully_masked_rows_give_bias_not_nan(backend):
    """Documented difference: a query that may attend to no key gets attention output 0 (the module returns
    ``out_proj.bias`` there) and finite gradients on both paths; torch's module returns NaN there when it computes
    the weights (``need_weights=True``, its default)."""
    torch_mha, ours = make_pair(batch_first=True)
    torch_mha.float()
    x = torch.randn(B, S, E)
    blocked = torch.zeros(S, S, dtype=torch.bool)
    blocked[2] = True  # query 2 may attend to nothing
    keep = torch.arange(S) != 2
    for need_weights in (False, True):
        torch_out, _ = torch_mha(x, x, x, attn_mask=blocked, need_weights=need_weights)
        if need_weights:
            assert torch.isnan(torch_out[:, 2]).all()
        xg = x.clone().requires_grad_()
        with backend_or_skip(backend):
            out, weights = ours(xg, xg, xg, attn_mask=blocked, need_weights=need_weights)
        torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(B, E).detach())
        if need_weights:
            assert (weights[:, 2] == 0).all()
        out.sum().backward()
        assert torch.isfinite(xg.grad).all()
        assert_parity(out[:, keep], out[:, keep], torch_out[:, keep].double(), name="other rows")


def test_dropout_in_training_only():
    _, ours = make_pair(dropout=0.5, batch_first=True)
    x = torch.randn(B, S, E)
    ours.eval()
    a, _ = ours(x, x, x, need_weights=False)
    b, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(a, b)
    ours.train()
    c, _ = ours(x, x, x, need_weights=False)
    assert not torch.allclose(a, c)

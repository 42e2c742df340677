"""The reference ops against independent computations: torch SDPA, closed-form tables, float64 gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from metagpt_fast.ops import reference


def _qkv(b=2, hq=4, hk=4, nq=17, nk=17, d=16, dtype=torch.float64):
    q = torch.randn(b, hq, nq, d, dtype=dtype)
    k = torch.randn(b, hk, nk, d, dtype=dtype)
    v = torch.randn(b, hk, nk, d, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(1, 1), (17, 17), (13, 29), (29, 13)])
def test_attention_matches_torch_sdpa(is_causal, nq, nk):
    q, k, v = _qkv(nq=nq, nk=nk)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    got = reference.attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("mask_shape", [(2, 4, 9, 11), (2, 1, 1, 11), (9, 11), (1, 4, 9, 1)])
@pytest.mark.parametrize("boolean", [True, False])
def test_attention_masks_match_torch(mask_shape, boolean):
    q, k, v = _qkv(nq=9, nk=11)
    if boolean:
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True  # torch gives NaN for fully-masked rows; keep one key per row for this comparison
    else:
        mask = torch.randn(mask_shape, dtype=torch.float64)
    torch.testing.assert_close(
        reference.attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )


def test_attention_gqa_and_scale_match_torch():
    q, k, v = _qkv(hq=6, hk=2, nq=7, nk=10)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(reference.attention(q, k, v, scale=0.3, enable_gqa=True, is_causal=True), expected)


def test_fully_masked_rows_give_zero_and_finite_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(nq=5, nk=6))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False
    out = reference.attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))
    additive = torch.zeros(5, 6, dtype=torch.float64)
    additive[3] = float("-inf")
    assert torch.equal(reference.attention(q, k, v, attn_mask=additive)[:, :, 3], torch.zeros(2, 4, 16, dtype=q.dtype))


def test_attention_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, hq=2, hk=1, nq=5, nk=7, d=3))
    mask = torch.rand(1, 1, 5, 7) > 0.4
    assert torch.autograd.gradcheck(lambda q, k, v: reference.attention(q, k, v, mask, enable_gqa=True), (q, k, v))


def test_attention_dropout_mask_replay():
    q, k, v = _qkv(nq=6, nk=6)
    keep = reference.dropout_keep_mask(42, (2, 4, 6, 6), 0.25)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(16)
    expected = (torch.softmax(scores, -1) * keep / 0.75) @ v
    torch.testing.assert_close(reference.attention(q, k, v, dropout_p=0.25, dropout_mask=keep), expected)


@pytest.mark.parametrize("d", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("offset", [0, 5])
def test_sinusoidal_table_closed_form(d, offset):
    table = reference.sinusoidal_table(12, d, offset, dtype=torch.float64)
    for pos in range(12):
        for j in range(d):
            i = j // 2
            angle = (pos + offset) / 10000 ** (2 * i / d)
            expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
            assert table[pos, j].item() == pytest.approx(expected, abs=1e-12)
    assert table.abs().sum() > 0  # the original article's table was all zeros


def test_add_positional_encoding_and_embed_positions():
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    torch.testing.assert_close(
        reference.add_positional_encoding(x, offset=3), x + reference.sinusoidal_table(9, 6, 3, dtype=torch.float64)
    )
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 9))
    out = reference.embed_positions(tokens, weight, scale=2.0, offset=1)
    torch.testing.assert_close(out, weight[tokens] * 2.0 + reference.sinusoidal_table(9, 6, 1, dtype=torch.float64))
    out.sum().backward()
    expected = torch.zeros_like(weight).index_add_(0, tokens.flatten(), torch.full((18, 6), 2.0, dtype=torch.float64))
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_closed_form_and_norm(interleaved):
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 1, 5, 8, dtype=torch.float64)
    qr, kr = reference.apply_rotary(q, k, offset=2, rotary_dim=6, interleaved=interleaved)
    # Rotation preserves each pair's norm and leaves features past rotary_dim untouched.
    torch.testing.assert_close(qr[..., 6:], q[..., 6:])
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    b, h, t = 1, 2, 4
    pos = t + 2
    for i in range(3):
        theta = pos / 10000 ** (2 * i / 6)
        a, c = (2 * i, 2 * i + 1) if interleaved else (i, i + 3)
        x1, x2 = q[b, h, t, a].item(), q[b, h, t, c].item()
        assert qr[b, h, t, a].item() == pytest.approx(x1 * math.cos(theta) - x2 * math.sin(theta), abs=1e-6)
        assert qr[b, h, t, c].item() == pytest.approx(x2 * math.cos(theta) + x1 * math.sin(theta), abs=1e-6)


def test_rotary_position_ids_equal_offset():
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    by_offset = reference.apply_rotary(q, k, offset=7)
    by_ids = reference.apply_rotary(q, k, position_ids=torch.arange(7, 12).expand(2, 5))
    for a, b in zip(by_offset, by_ids, strict=True):
        torch.testing.assert_close(a, b)


def test_rotary_gradcheck_float64():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: reference.apply_rotary(q, k, offset=1, interleaved=True), (q, k))

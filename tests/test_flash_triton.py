"""What is specific to the Triton flash attention kernels (kernels/triton/flash.py), under the interpreter.

The parity of outputs, lse and every gradient with the reference, over every feature, is in tests/test_flash_api.py
(it runs each registered implementation, this one included). Here:

1. Block skipping: each kernel counts the blocks it visits (``COUNT_VISITS``); the forward and dQ programs visit
   exactly the key blocks that hold a (query, key) pair their rows may attend, the dK/dV programs exactly the query
   blocks that do (once per query head of the GQA group), for windows, causal masks with Lq != Lk (bottom-right
   aligned), empty and length-1 sequences, with both orders of BLOCK_M and BLOCK_N. A window of ``w`` costs O(N w):
   doubling N doubles the visits.
2. Compile-time features: the window edges, softcap and ALiBi are constexpr flags set only when a call uses them
   (a window no pair can cross is no window), and the scale fold only where it is exact.
3. Registration: opcheck of both custom ops, the registry's reasons, a bitwise-repeatable backward.
4. The 16-bit softcap path (a shorter tanh than float32's) against the reference.
"""

import pytest
import torch
from helpers import interpreted_triton

from metagpt_fast import backends
from metagpt_fast.ops.reference import flash as reference_flash

# Block pointers (the kernels' non-descriptor loads) warn as deprecated in triton 3.8; they compile on 3.6 and 3.8.
pytestmark = [
    interpreted_triton("flash_attention"),
    pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated"),
]


def _kernels():
    from metagpt_fast.kernels.triton import flash

    return flash


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _cdiv(a, b):
    return -(-a // b)


def _needed(lq, lk, left, right, block_rows, block_cols, by_keys):
    """Per program of one sequence: how many blocks of the other side hold an allowed (query, key) pair. Programs
    own query blocks (``by_keys`` False: forward, dQ) or key blocks (dK/dV)."""
    allowed = reference_flash.allowed_mask(lq, lk, left, right, "cpu") if lq and lk else torch.zeros(lq, lk) > 0
    if by_keys:
        allowed = allowed.T
    rows, cols = allowed.shape
    counts = []
    for r0 in range(0, rows, block_rows):
        band = allowed[r0 : r0 + block_rows]
        counts.append(sum(bool(band[:, c0 : c0 + block_cols].any()) for c0 in range(0, cols, block_cols)))
    return counts


def _expected(lens_q, lens_k, left, right, heads, programs, block_rows, block_cols, by_keys, repeat=1):
    expected = torch.zeros(len(lens_q), heads, programs, dtype=torch.int32)
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        counts = _needed(lq, lk, left, right, block_rows, block_cols, by_keys)
        expected[b, :, : len(counts)] = torch.tensor(counts, dtype=torch.int32) * repeat
    return expected


def _run(lens_q, lens_k, left, right, tiles, hq=2, hk=1, d=16, softcap=0.0, alibi=False, scale=0.3):
    """Forward and backward through the launchers with block counters; returns (results, visits)."""
    flash = _kernels()
    (fm, fn), (km, kn), (qm, qn) = tiles
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    max_q, max_k = max(lens_q), max(lens_k)
    tq, tk, b = sum(lens_q), sum(lens_k), len(lens_q)
    q, k, v = torch.randn(tq, hq, d), torch.randn(tk, hk, d), torch.randn(tk, hk, d)
    slopes = torch.rand(b, hq) if alibi else None
    out, lse = torch.zeros(tq, hq, d), torch.full((hq, tq), float("inf"))
    visits_fwd = torch.zeros(b, hq, _cdiv(max_q, fm), dtype=torch.int32)
    args = (cu_q, cu_k, max_q, max_k, scale, left, right, softcap, slopes)
    flash.flash_forward(q, k, v, *args, out, lse, visits=visits_fwd, tiles=(fm, fn))
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    visits_dkdv = torch.zeros(b, hk, _cdiv(max_k, kn), dtype=torch.int32)
    visits_dq = torch.zeros(b, hq, _cdiv(max_q, qm), dtype=torch.int32)
    flash.flash_backward(
        grad_out, q, k, v, out, lse, *args, dq, dk, dv, torch.empty(hq, tq),
        visits=(visits_dkdv, visits_dq), tiles=((km, kn), (qm, qn)),
    )  # fmt: skip
    return (q, k, v, slopes, grad_out, out, lse, dq, dk, dv), (visits_fwd, visits_dkdv, visits_dq)


WINDOWS = [(-1, -1), (-1, 0), (5, 0), (3, 7), (0, 0), (-1, 2), (20, -1)]
# (forward, dK/dV, dQ) tiles as (BLOCK_M, BLOCK_N): BLOCK_M > BLOCK_N, then BLOCK_M < BLOCK_N.
TILES = {"m32n16": ((32, 16), (16, 32), (32, 16)), "m16n32": ((16, 32), (32, 16), (16, 32))}


def _visit_params():
    """Every window with both tile orders; two of them in the quick tier, the rest slow (the interpreter runs each
    program in turn: seconds a case)."""
    quick = {((5, 0), "m32n16"), ((3, 7), "m16n32")}
    return [
        pytest.param(window, TILES[name], id=f"w{window[0]}_{window[1]}-{name}",
                     marks=() if (window, name) in quick else pytest.mark.slow)
        for window in WINDOWS for name in TILES
    ]  # fmt: skip


@pytest.mark.parametrize("window, tiles", _visit_params())
def test_blocks_visited_are_exactly_those_with_an_allowed_pair(window, tiles):
    left, right = window
    # Lq < Lk, Lq > Lk (rows before the bottom-right diagonal see nothing), empty and length-1 sequences; more than
    # one block of the backward preprocess (68 tokens).
    lens_q, lens_k = [0, 1, 17, 38, 12], [3, 1, 9, 45, 0]
    (q, k, v, _, grad_out, out, lse, dq, dk, dv), (fwd, dkdv, dqv) = _run(lens_q, lens_k, left, right, tiles)
    (fm, fn), (km, kn), (qm, qn) = tiles
    hq, hk = q.shape[1], k.shape[1]
    assert torch.equal(fwd, _expected(lens_q, lens_k, left, right, hq, fwd.shape[2], fm, fn, False))
    assert torch.equal(dqv, _expected(lens_q, lens_k, left, right, hq, dqv.shape[2], qm, qn, False))
    group = hq // hk  # each dK/dV program loops over the query heads of its group
    assert torch.equal(dkdv, _expected(lens_q, lens_k, left, right, hk, dkdv.shape[2], kn, km, True, group))

    # The skipped blocks changed nothing: the results match the reference (float64, so the bound is loose enough
    # for any tile order; the precise parity rule is tests/test_flash_api.py's).
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_flash.flash_attention(*leaves, _cu(lens_q), _cu(lens_k), 0.3, left, right)
    grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, fast, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (ref_out, *grads), strict=True):
        torch.testing.assert_close(fast.double(), ref.detach(), atol=2e-5, rtol=1e-5, msg=name)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite].double(), atol=2e-5, rtol=1e-5)


def test_window_cost_is_linear_in_length():
    """A causal window of w = 24 keys over N = 128: no program visits more blocks than the window's width (plus a
    block) allows, whatever N, so the total is O(N w); the causal triangle's last programs visit all N."""
    tiles = TILES["m32n16"]
    (fm, fn), (km, kn), (qm, qn) = tiles
    n, w = 128, 24
    window = [int(v.max()) for v in _run([n], [n], w, 0, tiles, hq=1)[1]]
    # Keys a query block sees: w + BLOCK_M in a row; queries a key block is seen by: BLOCK_N + w.
    bounds = [_cdiv(w + fm - 1, fn) + 1, _cdiv(kn + w - 1, km) + 1, _cdiv(w + qm - 1, qn) + 1]
    assert all(v <= b for v, b in zip(window, bounds, strict=True)), (window, bounds)
    causal = [int(v.max()) for v in _run([n], [n], -1, 0, tiles, hq=1)[1]]
    assert causal == [n // fn, n // km, n // qn]


def test_features_are_compile_time_flags_set_only_when_used():
    flash = _kernels()
    plain = flash.features(100, 120, 0.125, -1, -1, 0.0, None)
    assert plain["flags"] == dict(WINDOW_LEFT=False, WINDOW_RIGHT=False, SOFTCAP=False, ALIBI=False)
    assert plain["fold"] and plain["windows"] == (0, 0)
    causal = flash.features(100, 120, 0.125, -1, 0, 0.0, None)
    assert causal["flags"]["WINDOW_RIGHT"] and not causal["flags"]["WINDOW_LEFT"] and causal["windows"] == (0, 0)
    # Edges no pair of these lengths can cross are no window (and never overflow 32 bits).
    assert flash.features(100, 120, 0.125, 119, 99, 0.0, None)["flags"] == plain["flags"]
    assert flash.features(100, 120, 0.125, 2**40, 2**40, 0.0, None)["flags"] == plain["flags"]
    both = flash.features(100, 120, 0.125, 118, 98, 0.0, None)
    assert both["flags"]["WINDOW_LEFT"] and both["flags"]["WINDOW_RIGHT"] and both["windows"] == (118, 98)
    heavy = flash.features(100, 120, 0.125, -1, -1, 30.0, torch.ones(1, 2))
    assert heavy["flags"]["SOFTCAP"] and heavy["flags"]["ALIBI"] and not heavy["fold"]
    assert not flash.features(100, 120, -0.125, -1, -1, 0.0, None)["fold"]  # max(s * c) != c * max(s) for c < 0
    for kernel in flash.KERNELS.values():  # every flag is a constexpr of every kernel that has it
        constexprs = {n for n, t in kernel.fn.__annotations__.items() if "constexpr" in str(t)}
        names = set(kernel.arg_names) & {"WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "ALIBI", "COUNT_VISITS"}
        assert names <= constexprs


def _op_inputs(hq=2, hk=1, d=16):
    lens_q, lens_k = [0, 7, 19], [4, 1, 23]
    q, k, v = torch.randn(sum(lens_q), hq, d), torch.randn(sum(lens_k), hk, d), torch.randn(sum(lens_k), hk, d)
    slopes = torch.rand(3, hq)
    return q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), 0.25, False, 4, 3, 2.0, slopes, 0.0, None


def test_custom_ops_pass_opcheck():
    from metagpt_fast.backends.triton import flash as triton_flash  # noqa: F401  (registers the ops)

    args = _op_inputs()
    # The fake-tensor and compile checks trace the op without data, which the interpreter cannot run
    # (docs/testing.md): the GPU suite covers torch.compile.
    utils = ("test_schema", "test_autograd_registration")
    forward = torch.ops.metagpt_fast.triton_flash_attention_forward.default
    torch.library.opcheck(forward, (args[0].requires_grad_(), *args[1:]), test_utils=utils)
    out, lse = forward(*args)
    backward = torch.ops.metagpt_fast.triton_flash_attention_backward.default
    torch.library.opcheck(
        backward, (torch.randn_like(out), *args[:3], out, lse, *args[3:]), test_utils=("test_schema",)
    )


def test_backward_is_bitwise_deterministic():
    from metagpt_fast.backends.triton import flash as triton_flash

    q, k, v, *rest = _op_inputs()
    grad_out = torch.randn(q.shape[0], q.shape[1], v.shape[-1])
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = triton_flash.flash_attention(*leaves, *rest)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_registered_with_reasons():
    impl = backends.lookup("flash_attention", "triton")
    assert impl.slow and impl.priority({}) == 20
    assert {"window", "softcap", "alibi", "gqa", "deterministic"} <= impl.capabilities.features
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap, slopes, dropout_p, _ = _op_inputs()
    ok = dict(
        q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scale, causal=causal, window_left=left, window_right=right, softcap=softcap,
        alibi_slopes=slopes, dropout_p=dropout_p,
    )  # fmt: skip
    assert impl.not_supported_reasons(**ok) == []
    wide = torch.randn(q.shape[0], 2, 512)
    for bad in (
        dict(ok, q=q.double(), k=k.double(), v=v.double()),
        dict(ok, q=q.bfloat16(), k=k.bfloat16(), v=v.bfloat16()),  # the interpreter's bf16 products
        dict(ok, q=wide, k=torch.randn(k.shape[0], 1, 512), v=torch.randn(k.shape[0], 1, 512)),
        dict(ok, dropout_p=0.1),
        dict(ok, q=torch.randn(16, q.shape[0], 2).transpose(0, 2)),  # feature stride != 1
    ):
        assert impl.not_supported_reasons(**bad), bad


def test_float16_softcap_matches_reference():
    """16-bit inputs take the short tanh (one exp2 and one reciprocal, ``_tanh_fast``); float32 the polynomial near
    0 (tests/test_flash_api.py). The parity rule on outputs and every gradient, with a window and GQA."""
    import metagpt_fast
    from metagpt_fast.testing import check_against_reference

    lens_q, lens_k = [1, 17], [3, 20]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v = torch.randn(18, 2, 32) * 2, torch.randn(23, 1, 32) * 2, torch.randn(23, 1, 32)

    def run(backend):
        return lambda q, k, v: metagpt_fast.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, 17, 20, window_size=(6, 3), softcap=1.5, backend=backend
        )

    inputs = [t.half() for t in (q, k, v)]
    check_against_reference(run("triton"), run("reference"), inputs, ["out", "dq", "dk", "dv"])

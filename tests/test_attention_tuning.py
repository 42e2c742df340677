"""Triton attention: autotune pruning (pure functions, no GPU), the forward's schedules and the backward's tensor
descriptors under the interpreter.

The pruning tests check the shared-memory estimate against the AOT compile's figures (triton 3.8, sm_90, bfloat16:
docs/triton-attention.md), that every tile of the tables fits the GPU it is listed for, that tiles over a smaller
GPU's limit go, and that tiles known to spill go where another one is left. The interpreter tests run the persistent
and warp-specialised forward schedules and both load paths of the backward (descriptors on aligned inputs, block
pointers on strided ones) against the reference: outputs and every gradient.
"""

import helpers
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402  (after the importorskip)

from metagpt_fast.kernels.triton import attention as kernels  # noqa: E402
from metagpt_fast.ops.reference import dropout_keep_mask  # noqa: E402
from metagpt_fast.ops.reference.attention import attention as reference_attention  # noqa: E402
from metagpt_fast.testing import assert_all_parity, attention_backward_slack, oracle_dtype  # noqa: E402

F16, F32 = torch.float16, torch.float32
NAMES = ("out", "dq", "dk", "dv")
SM80, SM86, SM90 = (8, 0), (8, 6), (9, 0)

# ------------------------------------------------------------------------------------------------- pruning

# Shared memory (KiB) of the sm_90 bfloat16 compiles (triton 3.8, docs/triton-attention.md): kind, D, heavy (dense
# additive mask and dropout), tile -> KiB.
AOT_SHARED_KIB = [
    ("fwd", 64, False, (128, 128, 8, 3), 113), ("fwd", 64, False, (64, 64, 4, 4), 73),
    ("fwd", 64, True, (128, 64, 8, 2), 64), ("fwd", 128, False, (128, 64, 8, 3), 129),
    ("fwd", 128, False, (64, 64, 4, 3), 113), ("fwd", 128, False, (128, 128, 8, 2), 161),
    ("fwd", 128, True, (128, 16, 8, 2), 56), ("fwd", 128, True, (64, 16, 4, 2), 36),
    ("fwd", 256, False, (128, 64, 8, 2), 192), ("fwd", 256, False, (128, 32, 8, 2), 128),
    ("fwd", 256, True, (64, 16, 8, 2), 68), ("dkdv", 64, False, (32, 128, 8, 3), 56),
    ("dkdv", 64, True, (16, 128, 8, 2), 44), ("dkdv", 64, True, (16, 64, 4, 2), 26),
    ("dkdv", 128, False, (32, 128, 8, 2), 96), ("dkdv", 128, False, (16, 128, 8, 2), 80),
    ("dkdv", 128, True, (16, 128, 8, 2), 84), ("dkdv", 256, False, (64, 16, 4, 1), 96),
    ("dkdv", 256, False, (32, 16, 4, 1), 64), ("dkdv", 256, True, (32, 16, 4, 1), 64),
    ("dq", 64, False, (128, 64, 8, 3), 80), ("dq", 64, False, (64, 64, 4, 3), 64),
    ("dq", 64, True, (128, 64, 8, 2), 80), ("dq", 128, False, (128, 32, 8, 3), 112),
    ("dq", 128, False, (64, 32, 4, 3), 80), ("dq", 128, True, (128, 32, 8, 2), 104),
    ("dq", 128, True, (64, 16, 4, 2), 50), ("dq", 256, False, (128, 32, 8, 2), 192),
    ("dq", 256, True, (16, 32, 4, 2), 49),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "d", "heavy", "tile", "kib"), AOT_SHARED_KIB)
def test_shared_memory_estimate_matches_the_aot_figures(kind, d, heavy, tile, kib):
    estimate = kernels.shared_memory_estimate(kind, tile, d, d, 2, dense_mask=heavy) / 1024
    if (kind, d, heavy) == ("dq", 256, True):  # its loads are not pipelined: an overestimate, the safe side
        assert kib <= estimate <= 2 * kib
    else:
        assert abs(estimate - kib) <= 4, estimate


def _families():
    return [
        (kind, (bits, width, heavy))
        for kind, table in kernels.TILES.items()
        for bits, width in table
        for heavy in ((False, True) if bits == 16 else (False,))
    ]


@pytest.mark.parametrize("capability", [SM80, SM90])
def test_every_listed_tile_fits_the_gpu_it_is_listed_for(capability):
    """Nothing in the tables is pruned on the GPUs they were written for (triton 3.8 spills none of them)."""
    limit = kernels.shared_memory_limit(capability)
    for kind, family in _families():
        listed = kernels.tiles(kind, family, capability)
        bits, width, heavy = family
        kept = kernels.prune_tiles(
            kind, listed, block_d=width, block_dv=width, itemsize=bits // 8, shared_limit=limit, dense_mask=heavy
        )
        assert kept == listed, (kind, family)


def test_tiles_over_the_shared_memory_limit_are_dropped():
    # sm_86 / sm_89 (99 KiB): the sm_80 forward list at D=128 (128 KiB and 128 KiB at 3 stages) does not fit; the
    # smallest tile is kept with one stage less (96 KiB).
    limit = kernels.shared_memory_limit(SM86)
    assert limit == 101376 == kernels.shared_memory_limit((8, 9))
    listed = kernels.tiles("fwd", (16, 128, False), SM86)
    assert listed == [(128, 64, 8, 3), (64, 64, 4, 3)]
    kept = kernels.prune_tiles("fwd", listed, block_d=128, block_dv=128, itemsize=2, shared_limit=limit)
    assert kept == [(64, 64, 4, 2)]
    # Only those over the limit go.
    mixed = [(128, 64, 8, 3), (64, 32, 4, 2)]
    assert kernels.prune_tiles("dq", mixed, block_d=128, block_dv=128, itemsize=2, shared_limit=limit) == [mixed[1]]
    # A limit below every tile at one stage still leaves one tile to run.
    assert kernels.prune_tiles("fwd", listed, block_d=128, block_dv=128, itemsize=2, shared_limit=1024) == [
        (64, 64, 4, 1)
    ]
    assert kernels.shared_memory_limit((7, 5)) == min(kernels.SHARED_MEMORY_PER_BLOCK.values())
    assert kernels.shared_memory_limit((9, 0)) == 232448


def test_tiles_known_to_spill_are_dropped_where_another_is_left(monkeypatch):
    monkeypatch.setattr(kernels, "TRITON_VERSION", (3, 6))
    family = (16, 128, False)
    spills = kernels.known_spills("dkdv", family, SM90)
    assert spills == {(32, 128, 8, 2)}
    listed = kernels.tiles("dkdv", family, SM90)
    args = dict(block_d=128, block_dv=128, itemsize=2, shared_limit=kernels.shared_memory_limit(SM90))
    assert kernels.prune_tiles("dkdv", listed, spills=spills, **args) == [(16, 128, 8, 2)]
    # The only tile of its list: kept, spill or not.
    heavy = (16, 64, True)
    only = kernels.tiles("fwd", heavy, SM90)
    assert kernels.prune_tiles("fwd", only, spills=kernels.known_spills("fwd", heavy, SM90), **args) == only
    # Not with triton 3.8, nor on another GPU.
    monkeypatch.setattr(kernels, "TRITON_VERSION", (3, 8))
    assert kernels.known_spills("dkdv", family, SM90) == frozenset()
    monkeypatch.setattr(kernels, "TRITON_VERSION", (3, 6))
    assert kernels.known_spills("dkdv", family, SM80) == frozenset()


def test_early_config_prune_works_on_the_autotuner_configs():
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in kernels.tiles("fwd", (16, 128, False), SM80)
    ]
    prune = kernels._early_config_prune("fwd", (16, 128, False), SM86, kernels.shared_memory_limit(SM86))
    [kept] = prune(configs, {"Q": None}, BLOCK_D=128, BLOCK_DV=128, MASK_KIND=0)
    assert (kept.kwargs, kept.num_warps, kept.num_stages) == ({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)
    # Head dims below the bucket's width make smaller tiles: D=96 (BLOCK_D 128) the same; on sm_80 both stay.
    prune = kernels._early_config_prune("fwd", (16, 128, False), SM80, kernels.shared_memory_limit(SM80))
    assert prune(configs, {}, BLOCK_D=128, BLOCK_DV=128) == configs
    # The autotuner carries the hook.
    tuned = kernels._autotuned("fwd", (16, 128, False), SM86, kernels.shared_memory_limit(SM86))
    assert tuned.early_config_prune is not None


def test_forward_schedule_choice(monkeypatch):
    monkeypatch.delenv(kernels.SCHEDULE_ENV_VAR, raising=False)
    plain = (16, 128, False)
    assert kernels.forward_schedule(None, plain, SM90) == "grid"
    monkeypatch.setenv(kernels.SCHEDULE_ENV_VAR, "Persistent")
    assert kernels.forward_schedule(None, plain, SM90) == "persistent"
    assert kernels.forward_schedule("grid", plain, SM90) == "grid"
    monkeypatch.setenv(kernels.SCHEDULE_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=kernels.SCHEDULE_ENV_VAR):
        kernels.forward_schedule(None, plain, SM90)
    assert kernels.forward_schedule("warp_specialize", plain, SM90) == "warp_specialize"
    # Where triton does not specialise it (sm_80, dropout or a dense mask, float32, D=256), the grid runs.
    for family, capability in [
        (plain, SM80),
        ((16, 128, True), SM90),
        ((32, 64, False), SM90),
        ((16, 256, False), SM90),
    ]:
        assert kernels.forward_schedule("warp_specialize", family, capability) == "grid"
    assert kernels.forward_schedule("warp_specialize", (32, 64, False), None) == "warp_specialize"  # interpreter
    assert kernels.tiles("fwd", plain, SM90, "warp_specialize") == kernels.WS_TILES[(16, 128)]


# --------------------------------------------------------------------------------- interpreter: schedules

interpreted_triton = helpers.interpreted_triton("attention")


def _check(q, k, v, *, mask=None, causal=False, dropout_p=0.0, scale=0.3, grad_out=None, seed=11, **kwargs):
    """Parity of the Triton op's output and gradients with the reference (the rule of metagpt_fast.testing), the
    inputs kept in their layout; ``kwargs`` are set on the kernel module for the call (a forward schedule)."""
    from metagpt_fast.backends.triton import attention as triton_attention

    b, hq, nq, _ = q.shape
    dv = v.shape[-1]
    grad_out = torch.randn(b, hq, nq, dv).to(q.dtype) if grad_out is None else grad_out
    seed_t = torch.tensor([seed], dtype=torch.int64) if dropout_p > 0 else None
    keep = dropout_keep_mask(seed_t, (b, hq, nq, k.shape[2]), dropout_p, "cpu") if dropout_p > 0 else None
    args = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=hq != k.shape[1])

    def run(fn, dt, **extra):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        m = mask.to(dt) if mask is not None and mask.is_floating_point() else mask
        out = fn(*leaves, **dict(args, attn_mask=m), **extra)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dt))]

    fast = run(lambda q, k, v, **kw: triton_attention.attention(q, k, v, **kw), q.dtype, seed=seed_t)
    lowp = run(reference_attention, q.dtype, dropout_mask=keep)
    exact = run(reference_attention, oracle_dtype(q.dtype), dropout_mask=keep)
    slack = attention_backward_slack(
        q, k, v, exact[0], grad_out, scale=scale, attn_mask=mask, is_causal=causal, dropout_mask=keep,
        dropout_p=dropout_p,
    )  # fmt: skip
    assert_all_parity(fast, lowp, exact, NAMES, (0.0, *slack))


def _qkv(b, hq, hk, nq, nk, d, dtype, dv=None):
    gen = torch.Generator().manual_seed(nq * 1000 + nk + d)
    return [
        torch.randn(b, h, n, e, generator=gen).to(dtype) for h, n, e in ((hq, nq, d), (hk, nk, d), (hk, nk, dv or d))
    ]


SCHEDULE_CASES = {
    "causal-gqa-odd": dict(shape=(2, 4, 2, 45, 51, 32, F32), causal=True),
    "key-padding-additive": dict(shape=(2, 2, 2, 37, 40, 16, F32), mask="additive"),  # split LSE
    "causal-fp16-d64": dict(shape=(1, 2, 2, 70, 70, 64, F16), causal=True),
    "full-nq-ne-nk-dv": dict(shape=(1, 2, 1, 33, 20, 48, F32, 16)),
    "dense-mask-dropout": dict(shape=(2, 2, 2, 29, 35, 32, F32), mask="dense", dropout_p=0.3),
}
QUICK_SCHEDULE_CASES = ("causal-gqa-odd", "key-padding-additive")  # the others in the slow tier


@interpreted_triton
@pytest.mark.parametrize("schedule", ["persistent", "warp_specialize"])
@pytest.mark.parametrize(
    "case", [c if c in QUICK_SCHEDULE_CASES else pytest.param(c, marks=pytest.mark.slow) for c in SCHEDULE_CASES]
)
def test_forward_schedules_match_reference(monkeypatch, schedule, case):
    """The persistent loop (3 programs, so each takes several tiles, longest first) and the one-loop form of the
    warp-specialised forward (every step masked; the grid runs where it does not apply: dropout, a dense mask)."""
    monkeypatch.setenv(kernels.SCHEDULE_ENV_VAR, schedule)
    spec = dict(SCHEDULE_CASES[case])
    q, k, v = _qkv(*spec.pop("shape"))
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    mask = spec.pop("mask", None)
    if mask == "additive":  # (B, 1, 1, Nk) key padding, the last keys of batch 1 at -inf
        mask = torch.zeros(b, 1, 1, nk)
        mask[1, ..., 30:] = float("-inf")
    elif mask == "dense":
        mask = torch.rand(b, 1, nq, nk, generator=torch.Generator().manual_seed(3)) > 0.3
    _check(q, k, v, mask=mask, **spec)


@interpreted_triton
def test_causal_query_blocks_run_longest_first(monkeypatch):
    """Program 0 of the causal grid takes the last query block (the most keys); the persistent schedule's first
    tiles are every head's last block."""
    seen = []
    original = kernels._attn_fwd_tile

    def spy(*args, **kwargs):  # called by the interpreted kernel in place of the tile function
        seen.append(tuple(int(getattr(x, "data", x)) for x in args[7:10]))  # start_m, h, b
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "_attn_fwd_tile", spy)
    q, k, v = _qkv(1, 2, 2, 70, 70, 16, F32)
    # The interpreter runs the programs one after the other (x outermost), as a GPU starts them by their index. The
    # persistent schedule's 3 programs take tiles (p, p + 3): tiles 0-1 are both heads' last block, 2-3 their middle
    # one; program 0 runs tiles 0 and 3.
    for schedule, first in (("grid", [(2, 0, 0), (2, 1, 0), (1, 0, 0)]), ("persistent", [(2, 0, 0), (1, 1, 0)])):
        seen.clear()
        out, lse = torch.empty_like(q), torch.empty(1, 1, 2, 70)
        kernels.attention_forward(q, k, v, None, out, lse, None, 0.0, True, 0.25, schedule=schedule)
        assert seen[: len(first)] == first, schedule
        assert sorted(seen) == sorted((m, h, 0) for m in range(3) for h in range(2)), schedule


# ------------------------------------------------------------------------------ interpreter: descriptors


class _Recorder:
    """A ``launch`` wrapper for the kernels' launchers: records each kernel's name and keyword arguments."""

    def __init__(self):
        self.calls = {}

    def __call__(self, kernel):
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    recorder.calls[kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__] = kwargs
                    return kernel[grid](*args, **kwargs)

                return run

        return Launch()


def _backward_flags(q, k, v):
    b, hq, nq, _ = q.shape
    out, lse = torch.empty(b, hq, nq, v.shape[-1], dtype=q.dtype), torch.empty(1, b, hq, nq)
    kernels.attention_forward(q, k, v, None, out, lse, None, 0.0, True, 0.3)
    recorder = _Recorder()
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kernels.attention_backward(
        torch.randn_like(out), q, k, v, out, lse, None, None, 0.0, True, 0.3, *grads, torch.empty(b, hq, nq),
        launch=recorder,
    )  # fmt: skip
    return recorder.calls["_attn_bwd_dkdv"]["DESCRIPTORS"], recorder.calls["_attn_bwd_dq"]["DESCRIPTORS"]


@interpreted_triton
@pytest.mark.parametrize("layout", ["aligned", "strided"])
def test_backward_descriptor_and_block_pointer_paths_match_reference(layout):
    """Aligned inputs run both backward kernels through tensor descriptors (dK/dV: Q and dO; dQ: K and V); inputs
    whose rows start off a 16-byte boundary run the block pointers. Both match the reference."""
    q, k, v = _qkv(1, 4, 2, 29, 37, 32, F32)
    if layout == "strided":  # q and k slices at an odd element offset, v with a last stride of 2
        q = torch.randn(1, 4, 29, 40)[..., 3:35]
        k = torch.randn(1, 2, 37, 33)[..., 1:]
        v = torch.randn(1, 2, 37, 64)[..., ::2]
    expected = (True, True) if layout == "aligned" else (False, False)
    assert _backward_flags(q, k, v) == expected
    _check(q, k, v, causal=True)


@interpreted_triton
def test_backward_keeps_block_pointers_where_descriptors_spill():
    """16-bit dK/dV at D=128 (attention.BLOCK_POINTER_FAMILIES) keeps block pointers; its dQ uses descriptors."""
    q, k, v = _qkv(1, 2, 2, 20, 20, 80, F16)
    assert _backward_flags(q, k, v) == (False, True)
    assert _backward_flags(*_qkv(1, 2, 2, 20, 20, 80, F32)) == (True, True)  # float32: its own family


def test_the_tuning_key_holds_every_flag_that_changes_the_compiled_kernel():
    # A tile tuned on aligned inputs (tensor descriptors, TMA) must not be reused for strided ones (block pointers):
    # they compile to different kernels. Every descriptor flag a kernel takes is in the autotuner's key.
    for kind in ("fwd", "dkdv", "dq"):
        flags = [name for name in kernels.KERNELS[kind].arg_names if name.endswith("DESCRIPTORS")]
        assert flags, kind
        missing = [name for name in flags if name not in kernels._autotuned(kind, (16, 128, False), SM90).keys]
        assert not missing, f"{kind}: {missing} not in the tuning key"

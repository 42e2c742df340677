"""Ahead-of-time compilation of the package's Triton kernels for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel for a given ``GPUTarget`` down to a cubin; ``cuobjdump`` (shipped in triton's
wheel, read by :mod:`metagpt_fast.devtools.sass`) then reports registers, stack (spills), local memory and shared
memory, and the SASS, from which each row counts the instructions that matter on Hopper (``HGMMA`` and its waits
``WARPGROUP.DEPBAR``, TMA ``UTMALDG``, cp.async ``LDGSTS``, ``LDG``, ``MUFU.EX2``) and the length of the main loop
(:func:`metagpt_fast.devtools.sass.main_loop`). The TTGIR says whether warps repeat a matmul's work
(:mod:`metagpt_fast.devtools.ttgir`), and ``ptxas -v`` (12.8 or newer) on each PTX with wgmma prints the advisories
C7510-C7515 when it serialises wgmma. This is how CI catches register spills, serialised or duplicated tensor-core
work and missing tensor-core instructions that the CPU interpreter can never show; :data:`GATES` are the checks.

The cases below cover every configuration the kernels' launchers and autotuners may pick on a GPU, built from the
tile tables the kernel modules export; ``tests/test_aot.py`` and ``scripts/aot_stats.py`` compile them all for
sm_80 and sm_90.

    python -m metagpt_fast.devtools.aot > aot.jsonl      # one JSON object per (case, arch)
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

from metagpt_fast._spec import triton_interpreted
from metagpt_fast.devtools import sass, ttgir
from metagpt_fast.kernels.triton import attention as attn
from metagpt_fast.kernels.triton import attention_fused_bwd as fused_bwd
from metagpt_fast.kernels.triton import bias_gelu, decode, norms, rotary
from metagpt_fast.kernels.triton import flash as flash_attn
from metagpt_fast.kernels.triton import linear_cross_entropy as lce
from metagpt_fast.kernels.triton import positional as pe

ARCHS = (80, 90)
DTYPES = {16: "bf16", 32: "fp32"}  # the attention cases' data type per operand width


@dataclasses.dataclass(frozen=True)
class AotCase:
    kernel: Any  # a @triton.jit function
    signature: dict[str, str]  # argument -> triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 2
    # Kernels whose matmuls must lower to Hopper tensor-core wgmma on sm_90.
    expect_wgmma: bool = False
    # Allowed stack bytes, with the reason in a comment at the case's definition; 0 means spills fail the check.
    allowed_spill_bytes: int = 0
    # Arguments Triton's launcher would see as multiples of 16 (aligned pointers, strides): enables vector loads.
    divisible_by_16: tuple[str, ...] = ()
    # The kernel's role for the gates ("fwd", "dq", "dkdv", "preprocess"; "" for the other ops), the element type
    # of its data ("bf16", "fp32"; "" when not given), and how many rows of the streamed operand one step of its main
    # loop consumes (keys for the forward and dQ, queries for dK/dV; 0 for kernels without such a loop).
    role: str = ""
    dtype: str = ""
    streamed_rows: int = 0
    # The architectures it is compiled for: those whose tile list holds it (see attention.tiles).
    archs: tuple[int, ...] = ARCHS
    # How many times warps may compute the same tensor-core product on sm_90 (1: never), with the reason at the
    # constant that allows more.
    allowed_replication: int = 1
    # The most SASS instructions one main-loop step may take per 128 streamed rows; None: no budget.
    loop_budget: int | None = None
    # Streamed operands read through tensor descriptors: on sm_90, TMA loads (UTMALDG) and no cp.async (LDGSTS) but,
    # with ``cp_async_rows``, that of per-row vectors (dK/dV's LSE and Delta rows, read by cp.async beside the TMA
    # tiles: attention.BLOCK_POINTER_FAMILIES says why they stay pointer loads).
    expect_tma: bool = False
    cp_async_rows: bool = False
    # A loop marked warp_specialize that triton must specialise on sm_90 (the TTGIR holds ttg.warp_specialize).
    expect_warp_specialized: bool = False

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        dtype = f",{self.dtype}" if self.dtype else ""
        return f"{self.kernel.__name__}[{consts},w{self.num_warps},s{self.num_stages}{dtype}]"


@dataclasses.dataclass(frozen=True)
class AotStats:
    label: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    uses_wgmma: bool
    # Whole-kernel counts of the opcode families of sass.OPCODES, and every instruction (SASS figures: sm_90 only,
    # zero and None on sm_80).
    opcodes: dict[str, int] = dataclasses.field(default_factory=dict)
    instructions: int = 0
    # One static iteration of the main loop (sass.main_loop): its instructions and opcode families; None without one.
    loop_instructions: int | None = None
    loop_opcodes: dict[str, int] | None = None
    # loop_instructions scaled to 128 streamed rows (128 keys in the forward), for comparing tiles.
    loop_instructions_per_128_rows: float | None = None
    # Each matmul of the TTGIR ("64x32 mma v3 warpsPerCTA=[8, 1] x2"), and those whose warps repeat work.
    dots: list[str] = dataclasses.field(default_factory=list)
    replicated_dots: list[str] = dataclasses.field(default_factory=list)
    # The most times warps compute one tensor-core product (1: no repeated work).
    replication: int = 1
    # ptxas -v advisory codes on a PTX with wgmma ("C7515"); None when not run (no wgmma: sm_80, float32, the other
    # ops; or no ptxas >= 12.8), with the ptxas used or the reason in ``ptxas``.
    ptxas_advisories: list[str] | None = None
    ptxas: str = ""
    # Whether triton warp-specialised a loop (the TTGIR holds a ttg.warp_specialize region).
    warp_specialized: bool = False

    @property
    def spill_bytes(self) -> int:
        return max(self.stack_bytes, self.local_bytes)


def case(
    kernel,
    constexprs: dict[str, Any],
    types: dict[str, str],
    *,
    unit_strides: tuple[str, ...] = (),
    aligned: tuple[str, ...] = (),
    unaligned: tuple[str, ...] = (),
    num_warps: int = 4,
    num_stages: int = 2,
    expect_wgmma: bool = False,
    allowed_spill_bytes: int = 0,
    role: str = "",
    dtype: str = "",
    streamed_rows: int = 0,
    archs: tuple[int, ...] = ARCHS,
    allowed_replication: int = 1,
    loop_budget: int | None = None,
    expect_tma: bool = False,
    cp_async_rows: bool = False,
    expect_warp_specialized: bool = False,
) -> AotCase:
    """One compile of ``kernel`` as Triton's launcher would specialise it for contiguous, aligned inputs.

    The signature follows ``kernel.arg_names``: the ``constexprs`` are "constexpr", ``types`` gives the type of
    the others by name (pointers such as "*bf16", floats "fp32"; names the kernel lacks are ignored, so one table
    can serve several kernels), every remaining argument is "i32". The launcher specialises a stride of 1 as a
    constant: every ``stride_*d`` argument (contiguous last dim) and those in ``unit_strides`` become the constexpr
    1, after ``constexprs`` (the order shows in the label). Pointers and strides are seen as multiples of 16, with
    ``aligned`` added and ``unaligned`` taken out. Like ``types``, these three name lists may hold names the kernel
    lacks. ``role``, ``dtype``, ``streamed_rows``, ``allowed_replication``, ``loop_budget``, ``expect_tma``,
    ``cp_async_rows`` and ``expect_warp_specialized`` are recorded for the gates, ``archs`` limits the targets
    (see :class:`AotCase`).
    """
    names = kernel.arg_names
    unknown = [name for name in constexprs if name not in names]
    if unknown:
        raise ValueError(f"{kernel.__name__} has no argument(s) {unknown}")
    last_dim = [name for name in names if name.startswith("stride_") and name.endswith("d")]
    constexprs = {**constexprs, **{name: 1 for name in (*last_dim, *unit_strides) if name in names}}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    divisible = tuple(
        name
        for name in names
        if signature[name] != "constexpr"
        and name not in unaligned
        and (signature[name].startswith("*") or name.startswith("stride_") or name in aligned)
    )
    return AotCase(
        kernel, signature, constexprs, num_warps, num_stages, expect_wgmma, allowed_spill_bytes, divisible, role,
        dtype, streamed_rows, archs, allowed_replication, loop_budget, expect_tma, cp_async_rows,
        expect_warp_specialized,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# cases


def attention_cases() -> list[AotCase]:
    """Every tile of every (bits, head-dim bucket) family, for the family's widest head dim: the training default
    (causal, nothing else) and the heaviest variant (dense additive mask + Philox dropout) of every tile the autotuner
    may pick; and the backward preprocess for each head dim bucket."""

    def types(bits: int, mask_kind: int) -> dict[str, str]:
        data = "*" + DTYPES[bits]
        mask = "*u8" if mask_kind == attn.MASK_BOOL else data
        pointers = dict.fromkeys(("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"), data)
        return {
            **pointers, "Mask": mask, "Lse": "*fp32", "Delta": "*fp32", "Seed": "*i64",
            "qk_scale": "fp32", "sm_scale": "fp32", "dropout_scale": "fp32",
        }  # fmt: skip

    # A contiguous mask (stride_mn = 1); its other strides, and the seed pointer, are not assumed aligned.
    layout = {"unit_strides": ("stride_mn",), "unaligned": ("Seed", "stride_mb", "stride_mh", "stride_mm")}

    def tile_case(
        kind, bits, width, tile, *, archs, descriptors, is_causal, mask_kind, has_dropout, schedule="grid"
    ) -> AotCase:
        block_m, block_n, num_warps, num_stages = tile
        # The forward's FOLD_SCALE for a positive scale (the usual one), KV_DESCRIPTORS (DESCRIPTORS in the backward)
        # as attention.stream_descriptors sets it for aligned inputs on the case's architectures, and its schedule.
        if kind == "fwd":
            forward = {
                "FOLD_SCALE": True, "KV_DESCRIPTORS": descriptors, "PERSISTENT": schedule == "persistent",
                "WARP_SPECIALIZE": schedule == "warp_specialize",
            }  # fmt: skip
        else:
            forward = {"DESCRIPTORS": descriptors}
        constexprs = {
            "HEAD_DIM": width, "HEAD_DIM_V": width, "BLOCK_D": width, "BLOCK_DV": width, "IS_CAUSAL": is_causal,
            "MASK_KIND": mask_kind, "MASK_ROW_BCAST": False, "HAS_DROPOUT": has_dropout, **forward,
            "BLOCK_M": block_m, "BLOCK_N": block_n,
        }  # fmt: skip
        return case(
            attn.KERNELS[kind], constexprs, types(bits, mask_kind), **layout, num_warps=num_warps,
            num_stages=num_stages,
            # Hopper's wgmma needs 64 rows per warpgroup in the left operand (keys for dK/dV, queries otherwise);
            # the few smaller tiles (D=256 backward, to avoid spills) run on mma.sync.
            expect_wgmma=bits == 16 and (block_n if kind == "dkdv" else block_m) >= 64,
            allowed_spill_bytes=attn.FP32_DKDV_256_SPILL if (kind, bits, width) == ("dkdv", 32, 256) else 0,
            role=kind, dtype=DTYPES[bits], streamed_rows=block_m if kind == "dkdv" else block_n, archs=archs,
            allowed_replication=(
                attn.SM90_HEAVY_FWD_256_REPLICATION if (kind, bits, width, has_dropout) == ("fwd", 16, 256, True)
                else 1
            ),
            # The budget is the grid schedule's: the warp-specialised form masks every step, and its figure is one
            # consumer warpgroup's loop (docs/triton-attention.md).
            loop_budget=(
                attn.FWD_128X128_LOOP_BUDGET
                if (kind, bits, block_m, block_n, mask_kind) == ("fwd", 16, 128, 128, attn.MASK_NONE) and width <= 128
                and schedule != "warp_specialize"
                else None
            ),
            expect_tma=descriptors,
            cp_async_rows=kind == "dkdv",
            expect_warp_specialized=schedule == "warp_specialize",
        )  # fmt: skip

    cases = []
    for kind, table in attn.TILES.items():
        for bits, width in table:
            for heavy in (False, True):
                # The tiles the autotuner may pick on each architecture; one case per tile, compiled for the
                # architectures whose list holds it.
                family = (bits, width, heavy and bits == 16)
                per_arch = {arch: attn.tiles(kind, family, divmod(arch, 10)) for arch in ARCHS}
                variant = {"is_causal": True, "mask_kind": attn.MASK_NONE, "has_dropout": False}
                if heavy:
                    variant = {"is_causal": False, "mask_kind": attn.MASK_ADDITIVE, "has_dropout": True}
                for tile in dict.fromkeys(tile for listed in per_arch.values() for tile in listed):
                    by_descriptors: dict[bool, tuple[int, ...]] = {}
                    for arch in (arch for arch in ARCHS if tile in per_arch[arch]):
                        descriptors = (
                            bits == 16 and arch >= 90 and not heavy
                            and (bits, width) not in attn.BLOCK_POINTER_FAMILIES.get(kind, ())
                        )  # fmt: skip
                        by_descriptors[descriptors] = (*by_descriptors.get(descriptors, ()), arch)
                    for descriptors, archs in by_descriptors.items():
                        cases.append(
                            tile_case(kind, bits, width, tile, archs=archs, descriptors=descriptors, **variant)
                        )
    # The forward's other schedules (attention.FORWARD_SCHEDULES), 16-bit on sm_90 with TMA: persistent on the first
    # tile of the causal lists, warp-specialised on its own tiles.
    for width in (64, 128):
        variant = {"is_causal": True, "mask_kind": attn.MASK_NONE, "has_dropout": False}
        first = attn.tiles("fwd", (16, width, False), (9, 0))[0]
        cases.append(
            tile_case("fwd", 16, width, first, archs=(90,), descriptors=True, schedule="persistent", **variant)
        )
        for tile in attn.tiles("fwd", (16, width, False), (9, 0), "warp_specialize"):
            cases.append(
                tile_case("fwd", 16, width, tile, archs=(90,), descriptors=True, schedule="warp_specialize", **variant)
            )
    for width in (64, 128, 256):
        for bits in (16, 32):
            constexprs = {"HEAD_DIM_V": width, "BLOCK_DV": width, "BLOCK_M": attn.preprocess_block_m(width)}
            preprocess = attn.KERNELS["preprocess"]
            cases.append(
                case(
                    preprocess, constexprs, types(bits, attn.MASK_NONE), **layout, num_stages=1, role="preprocess",
                    dtype=DTYPES[bits],
                )
            )  # fmt: skip
    return cases


def fused_backward_case(bits, width, tile, *, heavy, atomic, single=True, archs=ARCHS) -> AotCase:
    """The fused attention backward (kernels/triton/attention_fused_bwd.py) at one tile: causal without mask, or
    (``heavy``) a dense additive mask with dropout; dQ through the deterministic scratch or (``atomic``) atomics;
    one key block per program (``single``) or a loop over several."""
    block_m, block_n, num_warps, num_stages = tile
    data = "*" + DTYPES[bits]
    types = {
        **dict.fromkeys(("Q", "K", "V", "DOut", "DK", "DV", "Mask"), data), "Lse": "*fp32", "Delta": "*fp32",
        "DQAcc": "*fp32", "Seed": "*i64", "qk_scale": "fp32", "sm_scale": "fp32", "dropout_scale": "fp32",
    }  # fmt: skip
    constexprs = {
        "HEAD_DIM": width, "HEAD_DIM_V": width, "BLOCK_D": width, "BLOCK_DV": width, "IS_CAUSAL": not heavy,
        "MASK_KIND": attn.MASK_ADDITIVE if heavy else attn.MASK_NONE, "MASK_ROW_BCAST": False, "HAS_DROPOUT": heavy,
        "ATOMIC": atomic, "SINGLE_BLOCK": single, "BLOCK_M": block_m, "BLOCK_N": block_n,
    }  # fmt: skip
    layout = {"unit_strides": ("stride_mn",), "unaligned": ("Seed", "stride_mb", "stride_mh", "stride_mm")}
    return case(
        fused_bwd.KERNELS["fused"], constexprs, types, **layout, num_warps=num_warps, num_stages=num_stages,
        # keys are the rows of S^T, dP^T, dV and dK: wgmma needs 64 a warpgroup
        expect_wgmma=bits == 16 and block_n >= 64, role="fused_bwd", dtype=DTYPES[bits], streamed_rows=block_m,
        archs=archs,
    )  # fmt: skip


def fused_backward_cases() -> list[AotCase]:
    """Every tile of the fused backward's tables (one per family and architecture) with its family's variant and
    widest head dim: deterministic with one key block per program and, unless the family runs only so, with a loop
    over key blocks; atomic (one key block per program) for the families without mask and dropout; the dQ
    reduction per head dim bucket."""
    by_tile: dict[tuple, tuple[int, ...]] = {}
    for arch, table in fused_bwd.FUSED_TILES.items():
        for family, tile in table.items():
            bits, width, heavy = family
            forms = [(False, True)] + ([] if family in fused_bwd.SINGLE_BLOCK_ONLY else [(False, False)])
            for atomic, single in forms + ([(True, True)] if not heavy else []):
                key = (bits, width, heavy, atomic, single, tile)
                by_tile[key] = (*by_tile.get(key, ()), arch)
    cases = [
        fused_backward_case(bits, width, tile, heavy=heavy, atomic=atomic, single=single, archs=archs)
        for (bits, width, heavy, atomic, single, tile), archs in by_tile.items()
    ]
    for width in (64, 128, 256):
        for bits in (16, 32):
            types = {"DQAcc": "*fp32", "DQ": "*" + DTYPES[bits], "sm_scale": "fp32"}
            constexprs = {"HEAD_DIM": width, "BLOCK_D": width, "BLOCK_M": fused_bwd.REDUCE_BLOCK_M}
            cases.append(
                case(
                    fused_bwd.KERNELS["dq_reduce"], constexprs, types, unit_strides=("stride_dqd",), num_stages=1,
                    role="preprocess", dtype=DTYPES[bits],
                )
            )  # fmt: skip
    return cases


def flash_cases() -> list[AotCase]:
    """The flash attention kernels (kernels/triton/flash.py): every tile of every (bits, head-dim bucket) family,
    for the family's widest head dim, with the training default (causal: the right window edge only, the scale
    folded) and the heaviest variant (both window edges, softcap and ALiBi), the 16-bit forward with K and V through
    tensor descriptors on sm_90; the backward preprocess per head dim bucket. Strides in tokens are multiples of 16
    elements (head dims multiples of 16); the ALiBi and lse row strides (B and Tq) are not assumed aligned."""
    data = {name: "*{}" for name in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")}
    others = {
        "Cu_q": "*i32", "Cu_k": "*i32", "Alibi": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "Visits": "*i32",
        "qk_scale": "fp32", "cap_scale": "fp32", "cap2": "fp32", "sm_scale": "fp32",
    }  # fmt: skip
    layout = {"unaligned": ("stride_ab", "stride_lh", "Tq")}
    cases = []
    for kind, table in flash_attn.TILES.items():
        for (bits, width), tiles in table.items():
            types = {**{k: v.format(DTYPES[bits]) for k, v in data.items()}, **others}
            for heavy in (False, True):
                flags = {"WINDOW_LEFT": heavy, "WINDOW_RIGHT": True, "SOFTCAP": heavy, "ALIBI": heavy}
                # The 16-bit forward reads K and V through tensor descriptors on sm_90 (flash.kv_descriptors).
                by_arch = {(False, ARCHS)} if kind != "fwd" or bits != 16 else {(False, (80,)), (True, (90,))}
                for (block_m, block_n, num_warps, num_stages), (descriptors, archs) in itertools.product(
                    tiles, sorted(by_arch)
                ):
                    forward = {"FOLD_SCALE": not heavy} if kind == "fwd" else {}
                    constexprs = {
                        "HEAD_DIM": width, "HEAD_DIM_V": width, "BLOCK_D": width, "BLOCK_DV": width, **flags,
                        **forward, "COUNT_VISITS": False,
                        **({"KV_DESCRIPTORS": descriptors} if kind == "fwd" else {}),
                        "BLOCK_M": block_m, "BLOCK_N": block_n,
                    }  # fmt: skip
                    cases.append(
                        case(
                            flash_attn.KERNELS[kind], constexprs, types, **layout, num_warps=num_warps,
                            num_stages=num_stages,
                            expect_wgmma=bits == 16 and (block_n if kind == "dkdv" else block_m) >= 64,
                            role=kind, dtype=DTYPES[bits], streamed_rows=block_m if kind == "dkdv" else block_n,
                            archs=archs, expect_tma=descriptors,
                            allowed_spill_bytes=flash_attn.FP32_DKDV_SPILL if (kind, bits) == ("dkdv", 32) else 0,
                        )
                    )  # fmt: skip
    for width in (64, 128, 256):
        for bits in (16, 32):
            types = {**{k: v.format(DTYPES[bits]) for k, v in data.items()}, **others}
            constexprs = {"HEAD_DIM_V": width, "BLOCK_DV": width, "BLOCK_M": flash_attn.PREPROCESS_BLOCK_M}
            preprocess = flash_attn.KERNELS["preprocess"]
            cases.append(
                case(preprocess, constexprs, types, **layout, num_stages=1, role="preprocess", dtype=DTYPES[bits])
            )
    return cases


def positional_cases() -> list[AotCase]:
    """Every tile the launchers pick on a GPU, with the heaviest variant (gather + sinusoid + dropout) in bfloat16 and
    the add variant in float32; the embedding-gradient kernels with dropout. ``d`` is a multiple of 16."""
    floats = {"scale": "fp32", "base": "fp32", "keep_scale": "fp32", "grad_scale": "fp32"}
    grads = {
        **floats, "grad_ptr": "*bf16", "tokens_ptr": "*i64", "acc_ptr": "*fp32", "sorted_ptr": "*i64",
        "order_ptr": "*i64", "grad_weight_ptr": "*bf16", "partial_ptr": "*fp32", "seed_ptr": "*i64",
    }  # fmt: skip
    cases = []
    for block_d in pe.GPU_BLOCK_D:
        block_t = pe.TILE_ELEMENTS // block_d
        for dtype, gather in (("bf16", True), ("fp32", False)):
            types = {**floats, "src_ptr": f"*{dtype}", "tokens_ptr": "*i64", "out_ptr": f"*{dtype}", "seed_ptr": "*i64"}
            constexprs = {
                "GATHER": gather, "SINUSOIDAL": True, "HAS_DROPOUT": True, "BLOCK_T": block_t, "BLOCK_D": block_d,
            }  # fmt: skip
            cases.append(case(pe.KERNELS["forward"], constexprs, types, aligned=("D",), num_warps=pe.NUM_WARPS))
        constexprs = {"HAS_DROPOUT": True, "BLOCK_T": block_t, "BLOCK_D": block_d}
        cases.append(case(pe.KERNELS["grad_atomic"], constexprs, grads, aligned=("D",), num_warps=pe.NUM_WARPS))
        warps = pe.sorted_warps(block_d)
        constexprs = {"HAS_DROPOUT": True, "BLOCK_D": block_d}
        cases.append(case(pe.KERNELS["grad_sorted"], constexprs, grads, aligned=("D",), num_warps=warps))
        constexprs = {"COMBINE_ROWS": pe.COMBINE_ROWS, "BLOCK_D": block_d}
        cases.append(case(pe.KERNELS["grad_combine"], constexprs, grads, aligned=("D",), num_warps=warps))
    return cases


def rotary_cases() -> list[AotCase]:
    """Every (HALF_BLOCK, layout) the launcher picks on a GPU, with position ids and the pass-through copy (the
    heaviest variant), in bfloat16; head sizes multiples of 16, position ids contiguous."""
    data = dict.fromkeys(("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr"), "*bf16")
    types = {**data, "pos_ptr": "*i64", "base": "fp32", "sin_sign": "fp32"}
    cases = []
    for half_block in rotary.GPU_HALF_BLOCKS:
        for interleaved in (False, True):
            constexprs = {
                "HAS_POSITION_IDS": True, "INTERLEAVED": interleaved, "COPY_REST": True,
                "BLOCK_T": rotary.TILE_PAIRS // half_block, "HALF_BLOCK": half_block,
            }  # fmt: skip
            kernel = rotary.KERNELS["rotary"]
            aligned = {"aligned": ("HALF", "D"), "unaligned": ("stride_pt",)}
            cases.append(case(kernel, constexprs, types, **aligned, num_warps=rotary.NUM_WARPS))
    return cases


def decode_cases() -> list[AotCase]:
    """The decode split kernel at every tile the launcher picks for D = 64 and 128 (16 packed rows: a GQA group of 4
    to 16 query heads; 64: Nq = 4 x 16), 16-bit and float32 caches, paged and contiguous, with every score option
    on (softcap, ALiBi) and partial outputs (float32 paged only); the combine kernel for up to 128 splits at D = 128.
    Figures (registers, no spills on either arch) in kernels/triton/decode.py's ``gpu_tile``."""
    types = {"seqlens_ptr": "*i32", "batch_idx_ptr": "*i32", "table_ptr": "*i32", "slopes_ptr": "*fp32",
             "out_ptr": "*fp32", "lse_ptr": "*fp32", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
             "scale": "fp32", "softcap": "fp32"}  # fmt: skip
    cases = []
    for dtype, itemsize in (("bf16", 2), ("fp32", 4)):
        for block_d in (64, 128):
            tiles: dict[tuple[int, tuple[int, int]], tuple[int, ...]] = {}  # (rows, (keys, warps)) -> archs
            for block_m in (16, decode.MAX_PACKED_ROWS):
                for arch in ARCHS:
                    tile = (block_m, decode.gpu_tile(block_m, block_d, itemsize, (arch // 10, arch % 10)))
                    tiles[tile] = (*tiles.get(tile, ()), arch)
            for (block_m, (block_n, warps)), archs in tiles.items():
                for paged in (False, True) if dtype == "bf16" else (True,):  # float32: the heavier paged gather
                    constexprs = {
                        "GROUP": 4, "PAGE_SIZE": 16 if paged else 1, "PAGED": paged, "HAS_BATCH_IDX": not paged,
                        "HAS_ALIBI": True, "SOFTCAP": True, "SPLIT": True, "BLOCK_M": block_m, "BLOCK_N": block_n,
                        "BLOCK_D": block_d,
                    }  # fmt: skip
                    data = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr"), f"*{dtype}")
                    kernel = decode.KERNELS["decode_split"]
                    args = {"aligned": ("D",), "num_warps": warps, "dtype": dtype, "archs": archs}
                    cases.append(case(kernel, constexprs, {**types, **data}, **args))
    constexprs = {"BLOCK_S": decode.MAX_SPLITS, "BLOCK_D": 128}  # the largest combine tile
    types_c = {**types, "out_ptr": "*bf16"}
    cases.append(case(decode.KERNELS["decode_combine"], constexprs, types_c, aligned=("D",), num_warps=4))
    return cases


def linear_cross_entropy_cases() -> list[AotCase]:
    """The cross-entropy row kernel with every feature and gradients (its heaviest variant), in bfloat16 and
    float32, at the block the launcher picks for a large vocabulary."""
    cases = []
    for dtype in ("bf16", "fp32"):
        types = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "rows_scale_ptr": "*fp32", "losses_ptr": "*fp32",
                 "ignore_index": "i64", "grad_scale": "fp32", "eps": "fp32", "cap": "fp32"}  # fmt: skip
        constexprs = {"SOFTCAP": True, "SMOOTH": True, "GRADS": True, "HAS_ROWS": True, "BLOCK": lce.MAX_BLOCK}
        cases.append(case(lce.KERNELS["cross_entropy_rows"], constexprs, types, num_warps=lce.NUM_WARPS, dtype=dtype))
    return cases


def norm_cases() -> list[AotCase]:
    """LayerNorm and RMSNorm forward and backward with every feature (residual, affine, both gradients), at a model
    width and at the widest row the backend takes (norms.MAX_FEATURES), and bias+GELU in both forms, forward and
    backward, in bfloat16 and float32."""
    cases = []
    for dtype in ("bf16", "fp32"):
        data = ("x_ptr", "res_ptr", "w_ptr", "b_ptr", "y_ptr", "sum_ptr", "dy_ptr", "dsum_ptr", "dx_ptr", "out_ptr")
        types = {name: f"*{dtype}" for name in data}
        types.update({"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "eps": "fp32"})
        for block in (1024, norms.MAX_FEATURES):
            warps = norms._num_warps(block)
            for rms in (False, True):
                forward = {"HAS_RESIDUAL": True, "HAS_WEIGHT": True, "HAS_BIAS": not rms, "RMS": rms, "BLOCK_N": block}
                backward = {"HAS_GRAD_SUM": True, "HAS_WEIGHT": True, "WEIGHT_GRAD": True, "BIAS_GRAD": not rms,
                            "RMS": rms, "BLOCK_N": block}  # fmt: skip
                cases.append(case(norms.KERNELS["norm_forward"], forward, types, num_warps=warps, dtype=dtype))
                cases.append(case(norms.KERNELS["norm_backward"], backward, types, num_warps=warps, dtype=dtype))
        for tanh in (False, True):
            for grad in (False, True):
                constexprs = {"HAS_BIAS": True, "TANH": tanh, "BACKWARD": grad, "BIAS_GRAD": grad,
                              "BLOCK_ROWS": bias_gelu.BLOCK_ROWS, "BLOCK_N": 1024}  # fmt: skip
                cases.append(case(bias_gelu.KERNELS["bias_gelu"], constexprs, types, num_warps=4, dtype=dtype))
    return cases


def all_cases() -> list[AotCase]:
    return (
        attention_cases() + fused_backward_cases() + flash_cases() + positional_cases() + rotary_cases()
        + decode_cases() + linear_cross_entropy_cases() + norm_cases()
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# compile


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What :func:`compile_kernel` keeps of one compile: the cubin, the PTX and the TTGIR."""

    cubin: bytes
    ptx: str
    ttgir: str
    shared: int  # shared memory triton reports (dynamic; cuobjdump sees only the static part)


def compile_kernel(case: AotCase, arch: int) -> Compiled:
    """Compiles ``case`` for ``sm_<arch>`` (the CPU-heavy part: triton's passes, LLVM and ptxas)."""
    attrs = {(case.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in case.divisible_by_16}
    source = triton.compiler.ASTSource(
        fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    return Compiled(compiled.asm["cubin"], compiled.asm["ptx"], compiled.asm["ttgir"], shared)


def analyse(case: AotCase, arch: int, compiled: Compiled, ptxas: tuple[str | None, str] | None = None) -> AotStats:
    """The statistics of one compile: cuobjdump's resource usage (and on sm_90 its SASS), the TTGIR's matmuls, and
    for a PTX with wgmma the ptxas advisories (``ptxas``: :func:`sass.find_ptxas`'s answer, looked up when not
    given). Runs tools in subprocesses (ptxas beside cuobjdump), so it overlaps with the next compile in another
    thread."""
    tool, about = ptxas if ptxas is not None else sass.find_ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.cubin)
        assembler = None
        wgmma = "wgmma" in compiled.ptx
        if wgmma and tool is not None:  # C7510-C7515 are about wgmma: nothing to say on PTX without it
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.ptx)
            target = next((line.split()[1] for line in compiled.ptx.splitlines() if line.startswith(".target")), None)
            assembler = sass.run_ptxas(ptx, target or f"sm_{arch}a", tool)
        try:
            usage = sass.resource_usage(cubin)
            # The SASS figures are read on sm_90 only (what the gates check): the disassembly costs about as much
            # CPU as a ptxas run, and the sm_80 kernels run on mma.sync, whose figures no gate reads.
            listing = sass.listings(sass.sass(cubin)) if arch >= 90 else {None: []}
        finally:
            log = assembler.communicate()[0] if assembler is not None else None
    if assembler is not None and assembler.returncode != 0:
        raise RuntimeError(f"ptxas failed on the PTX of {case.label}: {log[-2000:]}")
    if len(usage) != 1 or len(listing) != 1:
        raise RuntimeError(f"expected one kernel in the cubin of {case.label}, found {[k.function for k in usage]}")
    kernel = usage[0]
    opcodes = next(iter(listing.values()))
    loop = sass.main_loop(opcodes)
    dots = ttgir.dots(compiled.ttgir)
    per_128 = None
    if loop is not None and case.streamed_rows:
        per_128 = round(loop.instructions * 128 / case.streamed_rows, 1)
    if not wgmma:
        about = "not run: the advisories C7510-C7515 are about wgmma, and the PTX has none"
    return AotStats(
        label=case.label,
        arch=arch,
        registers=kernel.registers,
        stack_bytes=kernel.stack,
        local_bytes=kernel.local,
        shared_bytes=max(kernel.shared, compiled.shared),
        uses_wgmma=wgmma,
        opcodes=sass.count_opcodes(i.opcode for i in opcodes),
        instructions=len(opcodes),
        loop_instructions=loop.instructions if loop else None,
        loop_opcodes=sass.count_opcodes(loop.opcodes) if loop else None,
        loop_instructions_per_128_rows=per_128,
        dots=[dot.describe() for dot in dots],
        replicated_dots=[dot.describe() for dot in dots if dot.replication > 1],
        replication=max((dot.replication for dot in dots if dot.tensor_core), default=1),
        ptxas_advisories=[a.code for a in sass.advisories(log)] if log is not None else None,
        ptxas=about,
        warp_specialized="ttg.warp_specialize" in compiled.ttgir,
    )


def compile_case(case: AotCase, arch: int) -> AotStats:
    """Compiles ``case`` for ``sm_<arch>`` and returns its statistics."""
    return analyse(case, arch, compile_kernel(case, arch))


def _row(case: AotCase, arch: int, work: Callable[[], AotStats]) -> dict[str, Any]:
    row = {
        "label": case.label,
        "arch": arch,
        "role": case.role,
        "dtype": case.dtype,
        "allowed_spill_bytes": case.allowed_spill_bytes,
        "allowed_replication": case.allowed_replication,
        "loop_budget": case.loop_budget,
        "expect_wgmma": case.expect_wgmma,
        "expect_tma": case.expect_tma,
        "cp_async_rows": case.cp_async_rows,
        "expect_warp_specialized": case.expect_warp_specialized,
    }
    try:
        stats = work()
    except Exception as exc:  # noqa: BLE001  (reported in the row, and failed by the test)
        row["error"] = f"{type(exc).__name__}: {exc}"
    else:
        row.update(dataclasses.asdict(stats), spill_bytes=stats.spill_bytes)
    return row


def stats_row(case: AotCase, arch: int) -> dict[str, Any]:
    """The JSON row of one compile: the case, its limits, and its stats or the compile error."""
    return _row(case, arch, lambda: compile_case(case, arch))


def stats_rows(cases: Iterable[AotCase], archs: Iterable[int] = ARCHS) -> Iterator[dict[str, Any]]:
    """:func:`stats_row` of every (case, arch) in ``archs`` and the case's own, in that order, with the analysis of
    one compile (cuobjdump, ptxas) in a worker thread while the next one compiles."""
    archs = tuple(archs)
    ptxas = sass.find_ptxas()
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for aot_case in cases:
            for arch in (arch for arch in archs if arch in aot_case.archs):
                try:
                    compiled = compile_kernel(aot_case, arch)
                except Exception as exc:  # noqa: BLE001  (reported in the row)
                    pending.append(pool.submit(_row, aot_case, arch, _raise(exc)))
                else:
                    work = functools.partial(analyse, aot_case, arch, compiled, ptxas)
                    pending.append(pool.submit(_row, aot_case, arch, work))
                while pending and pending[0].done():
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _raise(exc: Exception) -> Callable[[], AotStats]:
    def work() -> AotStats:
        raise exc

    return work


# ----------------------------------------------------------------------------------------------------------------
# gates: what tests/test_aot.py and scripts/aot_stats.py fail on, read from the JSON rows

SIXTEEN_BIT = ("bf16", "fp16")
# Waits for the tensor cores per wgmma in the 16-bit forward and dQ kernels. A pipelined kernel waits about once per
# matmul of its loop (QK^T, PV: 2 per step, against 12 HGMMA per step at D=128); ptxas's serialised form waits after
# every wgmma (1 per HGMMA).
MAX_DEPBAR_PER_HGMMA = 0.25


def _failed_compile(row: dict[str, Any]) -> str | None:
    return row.get("error")


def _spills(row: dict[str, Any]) -> str | None:
    if "error" not in row and row["spill_bytes"] > row["allowed_spill_bytes"]:
        return f"{row['spill_bytes']} B spilled (allowed {row['allowed_spill_bytes']}), {row['registers']} registers"
    return None


def _missing_wgmma(row: dict[str, Any]) -> str | None:
    if "error" not in row and row["expect_wgmma"] and row["arch"] >= 90 and not row["uses_wgmma"]:
        return "no wgmma in the PTX"
    return None


def _serialised_wgmma(row: dict[str, Any]) -> str | None:
    codes = [code for code in row.get("ptxas_advisories") or () if code in sass.SERIALIZATION_ADVISORIES]
    return f"ptxas serialises wgmma ({', '.join(codes)})" if codes else None


def _waits_per_wgmma(row: dict[str, Any]) -> str | None:
    if "error" in row or row["arch"] < 90 or row["role"] not in ("fwd", "dq") or row["dtype"] not in SIXTEEN_BIT:
        return None
    hgmma, waits = row["opcodes"]["HGMMA"], row["opcodes"]["WARPGROUP.DEPBAR"]
    if hgmma and waits / hgmma > MAX_DEPBAR_PER_HGMMA:
        return f"{waits} WARPGROUP.DEPBAR for {hgmma} HGMMA (at most {MAX_DEPBAR_PER_HGMMA} per HGMMA)"
    return None


def _replicated_products(row: dict[str, Any]) -> str | None:
    if "error" in row or row["arch"] < 90 or row["replication"] <= row["allowed_replication"]:
        return None
    tensor_core = [dot for dot in row["replicated_dots"] if " mma " in dot]
    return f"warps repeat the tensor-core products {tensor_core} (allowed x{row['allowed_replication']})"


def _over_loop_budget(row: dict[str, Any]) -> str | None:
    budget, used = row.get("loop_budget"), row.get("loop_instructions_per_128_rows")
    if "error" in row or row["arch"] < 90 or budget is None:
        return None
    if used is None or used > budget:
        return f"{used} SASS instructions per main-loop step (128 rows), budget {budget}"
    return None


def _missing_tma(row: dict[str, Any]) -> str | None:
    if "error" in row or row["arch"] < 90 or not row.get("expect_tma"):
        return None
    tma, cp_async = row["opcodes"]["UTMALDG"], row["opcodes"]["LDGSTS"]
    if tma == 0 or (cp_async and not row.get("cp_async_rows")):
        return f"{tma} UTMALDG and {cp_async} LDGSTS: expected TMA loads and no cp.async"
    return None


def _not_warp_specialized(row: dict[str, Any]) -> str | None:
    if "error" in row or row["arch"] < 90 or not row.get("expect_warp_specialized"):
        return None
    return None if row["warp_specialized"] else "triton left the warp_specialize loop unspecialised"


# name -> check of one row (a failure message, or None). "serialised_wgmma" needs ptxas >= 12.8; rows without it carry
# ptxas_advisories None and the reason in "ptxas".
GATES: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "compile": _failed_compile,
    "spills": _spills,
    "wgmma": _missing_wgmma,
    "serialised_wgmma": _serialised_wgmma,
    "waits_per_wgmma": _waits_per_wgmma,
    "replicated_products": _replicated_products,
    "loop_budget": _over_loop_budget,
    "tma": _missing_tma,
    "warp_specialized": _not_warp_specialized,
}


def gate_failures(rows: Iterable[dict[str, Any]], gate: str) -> list[str]:
    """``sm_<arch> <label>: <message>`` for each row that fails ``gate``."""
    check = GATES[gate]
    return [f"sm_{row['arch']} {row['label']}: {message}" for row in rows if (message := check(row))]


def main() -> int:
    """Compiles every case for every arch and prints one JSON object per line (kernel stats or an error)."""
    if triton_interpreted():
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs triton's real compiler")
    for row in stats_rows(all_cases()):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

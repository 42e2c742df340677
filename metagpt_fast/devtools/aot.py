"""Ahead-of-time compilation of the package's Triton kernels for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel for a given ``GPUTarget`` down to a cubin; ``cuobjdump --dump-resource-usage``
(shipped in triton's wheel, read by :mod:`metagpt_fast.devtools.sass`) then reports registers, stack (spills), local
memory and shared memory. This is how CI catches register spills and missing tensor-core instructions that the CPU
interpreter can never show.

The cases below cover every configuration the kernels' launchers and autotuners may pick on a GPU, built from the
tile tables the kernel modules export; ``tests/test_aot.py`` and ``scripts/aot_stats.py`` compile them all for
sm_80 and sm_90.

    python -m metagpt_fast.devtools.aot > aot.jsonl      # one JSON object per (case, arch)
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

from metagpt_fast._spec import triton_interpreted
from metagpt_fast.devtools import sass
from metagpt_fast.kernels.triton import attention as attn
from metagpt_fast.kernels.triton import positional as pe
from metagpt_fast.kernels.triton import rotary

ARCHS = (80, 90)


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

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.__name__}[{consts},w{self.num_warps},s{self.num_stages}]"


@dataclasses.dataclass(frozen=True)
class AotStats:
    label: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    uses_wgmma: bool

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
) -> AotCase:
    """One compile of ``kernel`` as Triton's launcher would specialise it for contiguous, aligned inputs.

    The signature follows ``kernel.arg_names``: the ``constexprs`` are "constexpr", ``types`` gives the type of
    the others by name (pointers such as "*bf16", floats "fp32"; names the kernel lacks are ignored, so one table
    can serve several kernels), every remaining argument is "i32". The launcher specialises a stride of 1 as a
    constant: every ``stride_*d`` argument (contiguous last dim) and those in ``unit_strides`` become the constexpr
    1, after ``constexprs`` (the order shows in the label). Pointers and strides are seen as multiples of 16, with
    ``aligned`` added and ``unaligned`` taken out. Like ``types``, these three name lists may hold names the kernel
    lacks.
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
    return AotCase(kernel, signature, constexprs, num_warps, num_stages, expect_wgmma, allowed_spill_bytes, divisible)


# ----------------------------------------------------------------------------------------------------------------
# cases


def attention_cases() -> list[AotCase]:
    """Every tile of every (bits, head-dim bucket) family, for the family's widest head dim: the training default
    (causal, nothing else) and the heaviest variant (dense additive mask + Philox dropout) of every tile the autotuner
    may pick; and the backward preprocess for each head dim bucket."""

    def types(bits: int, mask_kind: int) -> dict[str, str]:
        data = "*bf16" if bits == 16 else "*fp32"
        mask = "*u8" if mask_kind == attn.MASK_BOOL else data
        pointers = dict.fromkeys(("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"), data)
        return {
            **pointers, "Mask": mask, "Lse": "*fp32", "Delta": "*fp32", "Seed": "*i64",
            "qk_scale": "fp32", "sm_scale": "fp32", "dropout_scale": "fp32",
        }  # fmt: skip

    # A contiguous mask (stride_mn = 1); its other strides, and the seed pointer, are not assumed aligned.
    layout = {"unit_strides": ("stride_mn",), "unaligned": ("Seed", "stride_mb", "stride_mh", "stride_mm")}

    def tile_case(kind, bits, width, tile, *, is_causal, mask_kind, has_dropout) -> AotCase:
        block_m, block_n, num_warps, num_stages = tile
        constexprs = {
            "HEAD_DIM": width, "HEAD_DIM_V": width, "BLOCK_D": width, "BLOCK_DV": width, "IS_CAUSAL": is_causal,
            "MASK_KIND": mask_kind, "MASK_ROW_BCAST": False, "HAS_DROPOUT": has_dropout, "BLOCK_M": block_m,
            "BLOCK_N": block_n,
        }  # fmt: skip
        return case(
            attn.KERNELS[kind], constexprs, types(bits, mask_kind), **layout, num_warps=num_warps,
            num_stages=num_stages,
            # Hopper's wgmma needs 64 rows per warpgroup in the left operand (keys for dK/dV, queries otherwise);
            # the few smaller tiles (D=256 backward, to avoid spills) run on mma.sync.
            expect_wgmma=bits == 16 and (block_n if kind == "dkdv" else block_m) >= 64,
            allowed_spill_bytes=attn.FP32_DKDV_256_SPILL if (kind, bits, width) == ("dkdv", 32, 256) else 0,
        )  # fmt: skip

    cases = []
    for kind, table in attn.TILES.items():
        for (bits, width), plain in table.items():
            for tile in plain:
                cases.append(
                    tile_case(kind, bits, width, tile, is_causal=True, mask_kind=attn.MASK_NONE, has_dropout=False)
                )
            for tile in attn.tiles(kind, (bits, width, bits == 16)):
                cases.append(
                    tile_case(kind, bits, width, tile, is_causal=False, mask_kind=attn.MASK_ADDITIVE, has_dropout=True)
                )
    for width in (64, 128, 256):
        for bits in (16, 32):
            constexprs = {"HEAD_DIM_V": width, "BLOCK_DV": width, "BLOCK_M": attn.preprocess_block_m(width)}
            cases.append(
                case(attn.KERNELS["preprocess"], constexprs, types(bits, attn.MASK_NONE), **layout, num_stages=1)
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


def all_cases() -> list[AotCase]:
    return attention_cases() + positional_cases() + rotary_cases()


# ----------------------------------------------------------------------------------------------------------------
# compile


def compile_case(case: AotCase, arch: int) -> AotStats:
    """Compiles ``case`` for ``sm_<arch>`` and returns its resource usage."""
    attrs = {(case.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in case.divisible_by_16}
    source = triton.compiler.ASTSource(
        fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = sass.resource_usage(f.name)
    if len(usage) != 1:
        raise RuntimeError(f"expected one kernel in the cubin of {case.label}, found {[k.function for k in usage]}")
    kernel = usage[0]
    return AotStats(
        label=case.label,
        arch=arch,
        registers=kernel.registers,
        stack_bytes=kernel.stack,
        local_bytes=kernel.local,
        shared_bytes=max(kernel.shared, int(getattr(compiled.metadata, "shared", 0) or 0)),
        uses_wgmma="wgmma" in compiled.asm["ptx"],
    )


def stats_row(case: AotCase, arch: int) -> dict[str, Any]:
    """The JSON row of one compile: the case, its limits, and its stats or the compile error."""
    row = {
        "label": case.label,
        "arch": arch,
        "allowed_spill_bytes": case.allowed_spill_bytes,
        "expect_wgmma": case.expect_wgmma,
    }
    try:
        stats = compile_case(case, arch)
    except Exception as exc:  # noqa: BLE001  (reported in the row, and failed by the test)
        row["error"] = f"{type(exc).__name__}: {exc}"
    else:
        row.update(dataclasses.asdict(stats), spill_bytes=stats.spill_bytes)
    return row


def main() -> int:
    """Compiles every case for every arch and prints one JSON object per line (kernel stats or an error)."""
    if triton_interpreted():
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs triton's real compiler")
    for aot_case in all_cases():
        for arch in ARCHS:
            print(json.dumps(stats_row(aot_case, arch)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

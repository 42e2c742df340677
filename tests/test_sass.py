"""The readers of ``metagpt_fast.devtools`` (cuobjdump, ptxas and TTGIR text) on canned reports: no compiler needed."""

from metagpt_fast.devtools import sass, ttgir

# `cuobjdump --dump-resource-usage` of a host library with an embedded fatbin: one section per architecture.
FATBIN_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit
identifier = attention_bwd_bf16.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN12metagpt_fast9attention28attention_backward_dq_kernelI13__nv_bfloat16EEvNS0_15AttentionParamsE:
  REG:253 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN12metagpt_fast9attention31attention_backward_delta_kernelI13__nv_bfloat16EEvNS0_15AttentionParamsE:
  REG:46 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]
host = linux
compile_size = 64bit
identifier = attention_bwd_bf16.cu

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN12metagpt_fast9attention28attention_backward_dq_kernelI13__nv_bfloat16EEvNS0_15AttentionParamsE:
  REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# The same report for a bare cubin (what triton.compile produces): no architecture line.
CUBIN_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _attn_fwd:
  REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:696 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# `cuobjdump -sass` excerpts (encodings shortened) of two kernels of a Hopper cubin and one of an Ampere one.
SASS = """
\tcode for sm_90a
\t\tFunction : _attn_fwd
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
                                                                                        /* 0x000e620000000800 */
        /*04e0*/               @P2 LDG.E.128 R28, desc[UR26][R2.64] ;                   /* 0x0000001a021c2981 */
        /*0bc0*/              @!PT LDS RZ, [RZ] ;                                       /* 0x00000000fffff984 */
        /*0bf0*/                   LDGSTS.E.BYPASS.128 [R132], desc[UR26][R24.64], P0 ; /* 0x0000000018847fae */
        /*0cd0*/                   LDGDEPBAR ;                                          /* 0x00000000000079af */
        /*0ce0*/                   UTMALDG.2D [UR8], [UR4] ;                            /* 0x00000000040075b4 */
        /*1410*/                   WARPGROUP.ARRIVE ;                                   /* 0x00000000000079c5 */
        /*1420*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ; /* 0x01e00000081879f0 */
        /*14c0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                      /* 0x00008000000079c5 */
        /*14e0*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ; /* 0x01e00000081879f0 */
        /*1500*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;                      /* 0x00008000000079c5 */
        /*4880*/               @P5 MUFU.EX2 R25, R28 ;                                  /* 0x0000001c00195308 */
        /*4890*/                   MUFU.RCP R26, R29 ;                                  /* 0x0000001d001a7308 */
        /*9a10*/                   LDSM.16.M88.4 R16, [R120] ;                          /* 0x000000007810783b */
        /*9a20*/                   LDS.128 R4, [R120+0x800] ;                           /* 0x0008000078047984 */
        /*9a30*/             @!UP0 UIADD3 UR4, UR4, -UR11, URZ ;                        /* 0x8000000b04048290 */
        /*9a40*/                   EXIT ;                                               /* 0x000000000000794d */
        .L_x_0:
        /*9a50*/                   BRA `(.L_x_0) ;                                      /* 0xfffffffc00fc7947 */
\t\t..........

\t\tFunction : _attn_bwd_preprocess
        /*0000*/                   LDG.E.64 R2, desc[UR4][R2.64] ;                      /* 0x0000000402027981 */
        /*0010*/                   EXIT ;                                               /* 0x000000000000794d */

\tcode for sm_80
\t\tFunction : _attn_fwd
        /*42d0*/                   HMMA.16816.F32.BF16 R28, R84, R28, RZ ;              /* 0x0000001c541c723c */
        /*42e0*/              @!P1 HMMA.16816.F32.BF16 R32, R88, R32, R28 ;             /* 0x00000020581c723c */
        /*4300*/                   MUFU.EX2 R25, R28 ;                                  /* 0x0000001c00195308 */
"""


def test_resource_usage_of_a_fatbin_is_per_arch_and_function():
    kernels = sass.parse_resource_usage(FATBIN_USAGE)
    assert [(k.arch, k.registers, k.stack, k.shared, k.local) for k in kernels] == [
        ("sm_80", 253, 0, 0, 0),
        ("sm_80", 46, 16, 0, 8),
        ("sm_90a", 168, 0, 1024, 0),
    ]
    assert kernels[0].function.startswith("_ZN12metagpt_fast9attention28attention_backward_dq_kernel")
    assert [k.spill_bytes for k in kernels] == [0, 16, 0]


def test_resource_usage_of_a_cubin_has_no_arch():
    assert sass.parse_resource_usage(CUBIN_USAGE) == [sass.KernelResources(None, "_attn_fwd", 168, 0, 1024, 0)]
    assert sass.parse_resource_usage("") == []


def test_instructions_skip_encodings_labels_and_never_run_padding():
    ops = sass.instructions(SASS)
    assert ops[:6] == ["LDC", "LDG.E.128", "LDGSTS.E.BYPASS.128", "LDGDEPBAR", "UTMALDG.2D", "WARPGROUP.ARRIVE"]
    assert "UIADD3" in ops  # uniform predicate @!UP0
    assert ops.count("BRA") == 1 and ops.count("EXIT") == 2
    assert len(ops) == 17 + 2 + 3


def test_functions_split_by_arch_and_kernel():
    by_kernel = sass.functions(SASS)
    assert list(by_kernel) == [("sm_90a", "_attn_fwd"), ("sm_90a", "_attn_bwd_preprocess"), ("sm_80", "_attn_fwd")]
    assert by_kernel[("sm_90a", "_attn_bwd_preprocess")] == ["LDG.E.64", "EXIT"]
    assert sum(len(ops) for ops in by_kernel.values()) == len(sass.instructions(SASS))


def test_opcode_families_count_modifiers_but_not_longer_opcodes():
    by_kernel = sass.functions(SASS)
    hopper = sass.count_opcodes(by_kernel[("sm_90a", "_attn_fwd")])
    assert hopper == {
        "HGMMA": 2,
        "WARPGROUP.DEPBAR": 2,  # not WARPGROUP.ARRIVE
        "HMMA": 0,
        "LDSM": 1,
        "LDGSTS": 1,
        "UTMALDG": 1,
        "LDG": 1,  # LDG.E.128; not LDGSTS, not LDGDEPBAR
        "LDS": 1,  # LDS.128; not LDSM, not the @!PT padding
        "MUFU.EX2": 1,  # not MUFU.RCP
    }
    ampere = sass.count_opcodes(by_kernel[("sm_80", "_attn_fwd")], ("HMMA", "HGMMA", "MUFU.EX2"))
    assert ampere == {"HMMA": 2, "HGMMA": 0, "MUFU.EX2": 1}
    assert sass.count_opcodes(SASS, ("LDG", "EXIT")) == {"LDG": 2, "EXIT": 2}


# `nvcc -Xptxas -v` for two architectures; `big` is a device function that was not inlined.
PTXAS = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z5spillPfi' for 'sm_80'
ptxas info    : Function properties for _Z3bigi
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for _Z5spillPfi
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 29 registers, used 0 barriers, 364 bytes cmem[0]
ptxas info    : Compile time = 20.186 ms
ptxas info    : Compiling entry function '_Z3addPfPKfi' for 'sm_90'
ptxas info    : Function properties for _Z3addPfPKfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 1 barriers, 1024 bytes smem
"""


def test_ptxas_log_reports_each_entry_function():
    assert sass.parse_ptxas(PTXAS) == [
        sass.PtxasKernel("sm_80", "_Z5spillPfi", registers=29, stack=8, spill_stores=4, spill_loads=4, shared=0),
        sass.PtxasKernel("sm_90", "_Z3addPfPKfi", registers=12, stack=0, spill_stores=0, spill_loads=0, shared=1024),
    ]


# A kernel with the shape of the attention kernels (encodings left out): an outer loop over heads holding two inner
# loops that issue the same matmuls, an unmasked one (short) and a masked one (longer); a branch that skips the
# second (forward, not a loop); the BRA to itself after EXIT (not a loop); @!PT padding inside the first loop.
LOOPS_SASS = """
\tcode for sm_90a
\t\tFunction : _attn_bwd_dkdv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, R3, PT ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R6.64] ;
        /*0030*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/              @!PT LDS RZ, [RZ] ;
        /*0060*/                   FMUL R8, R24, R9 ;
        /*0070*/              @!P0 BRA 0x30 ;
        /*0080*/               @P1 BRA 0xf0 ;
        /*0090*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*00a0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00b0*/                   FSEL R8, R24, -INF , P2 ;
        /*00c0*/                   MUFU.EX2 R8, R8 ;
        /*00d0*/                   FMUL R8, R24, R9 ;
        /*00e0*/              @!P3 BRA.U !UP0, 0x90 ;
        /*00f0*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0100*/               @P4 BRA 0x10 ;
        /*0110*/                   EXIT ;
        .L_x_0:
        /*0120*/                   BRA 0x120;
"""


def test_listing_keeps_addresses_and_branch_targets():
    [listing] = sass.listings(LOOPS_SASS).values()
    assert [i.opcode for i in listing] == sass.functions(LOOPS_SASS)[("sm_90a", "_attn_bwd_dkdv")]
    assert listing[0] == sass.Instruction(0x0, "MOV")
    branches = [(i.address, i.target) for i in listing if i.target is not None]
    assert branches == [(0x70, 0x30), (0x80, 0xF0), (0xE0, 0x90), (0x100, 0x10), (0x120, 0x120)]


def test_loops_are_backward_branches_innermost_by_default():
    [listing] = sass.listings(LOOPS_SASS).values()
    inner = sass.loops(listing)
    assert [(loop.start, loop.end, loop.instructions) for loop in inner] == [(0x30, 0x70, 4), (0x90, 0xE0, 6)]
    assert inner[0].opcodes == ("HGMMA.64x32x16.F32.BF16", "WARPGROUP.DEPBAR.LE", "FMUL", "BRA")  # no @!PT padding
    every = sass.loops(listing, innermost=False)
    assert [(loop.start, loop.end) for loop in every] == [(0x10, 0x100), (0x30, 0x70), (0x90, 0xE0)]


def test_main_loop_is_the_shortest_of_those_with_the_most_matmuls():
    [listing] = sass.listings(LOOPS_SASS).values()
    main = sass.main_loop(listing)
    assert (main.start, main.instructions) == (0x30, 4)
    # With a third HGMMA in the longer loop, that loop carries more matmuls and becomes the main one.
    extra = LOOPS_SASS.replace("FSEL R8, R24, -INF , P2", "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24, gsb0")
    assert sass.main_loop(next(iter(sass.listings(extra).values()))).start == 0x90
    # Without tensor-core instructions, FFMA marks the matmuls (float32 on FMA units).
    fma = LOOPS_SASS.replace("HGMMA.64x32x16.F32.BF16", "HADD2").replace(
        "/*00d0*/                   FMUL", "/*00d0*/ FFMA"
    )
    assert sass.main_loop(next(iter(sass.listings(fma).values()))).start == 0x90
    straight = sass.listings(SASS)[("sm_90a", "_attn_bwd_preprocess")]
    assert sass.loops(straight) == [] and sass.main_loop(straight) is None


# `ptxas -v` on a Triton PTX whose wgmma are serialised (CUDA 12.9 and 13.0 print the same advisory).
PTXAS_ADVISORY = """
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function '_attn_fwd'
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 172 registers, used 1 barriers
"""  # noqa: E501


def test_ptxas_advisories_are_read_with_their_code():
    [advisory] = sass.advisories(PTXAS_ADVISORY)
    assert advisory.code == "C7515" and advisory.code in sass.SERIALIZATION_ADVISORIES
    assert advisory.message.startswith("Potential Performance Loss: wgmma.mma_async instructions are serialized")
    assert sass.advisories(PTXAS) == []
    assert sass.SERIALIZATION_ADVISORIES == ("C7510", "C7511", "C7512", "C7513", "C7514", "C7515")
    [kernel] = sass.parse_ptxas(PTXAS_ADVISORY)
    assert (kernel.function, kernel.registers, kernel.stack) == ("_attn_fwd", 172, 0)


def test_find_ptxas_says_why_when_none_is_recent_enough():
    tool, why = sass.find_ptxas(minimum=(999, 0))
    assert tool is None and why.startswith("no ptxas >= 999.0 (found: ")


# TTGIR excerpts (locations shortened) of dK/dV at D=128 with 32 x 64 tiles on 8 warps, and an mma.sync and an FMA
# product: the 64 x 32 scores under warpsPerCTA = [8, 1] need 128 rows for one pass, so both warpgroups compute them.
TTGIR = """
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [2, 16], warpsPerCTA = [8, 1], order = [1, 0]}>
#loc1 = loc(unknown)
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 16, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 64, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>
module attributes {"ttg.num-warps" = 8 : i32} {
    %s_t_236 = ttng.warp_group_dot %tile_41, %s_t_232, %cst_0 {isAsync = true} : !ttg.memdesc<64x128xbf16, #shared, #smem> * !ttg.memdesc<128x32xbf16, #shared2, #smem, mutable> -> tensor<64x32xf32, #mma> loc(#loc209)
    %s_t_237:3 = ttng.warp_group_dot_wait %s_t_236, %tile_41, %s_t_232 {pendings = 0 : i32} : tensor<64x32xf32, #mma>, !ttg.memdesc<64x128xbf16, #shared, #smem> loc(#loc209)
    %dv_250 = ttng.warp_group_dot %dv_249, %tile_245, %dv_212 {isAsync = true} : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 2}>> * !ttg.memdesc<32x128xbf16, #shared, #smem, mutable> -> tensor<64x128xf32, #mma1> loc(#loc224)
    %s = tt.dot %a, %b, %c : tensor<32x256xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma2, kWidth = 2}>> * tensor<256x16xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma2, kWidth = 2}>> -> tensor<32x16xf32, #mma2> loc(#loc211)
    %f = tt.dot %x, %y, %z, inputPrecision = ieee : tensor<16x64xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<64x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked> loc(#loc7)
}
"""  # noqa: E501


def test_ttgir_layouts_cover_warps_times_instruction_or_thread_tiles():
    layouts = ttgir.layouts(TTGIR)
    assert set(layouts) == {"#blocked", "#mma", "#mma1", "#mma2"}
    assert layouts["#mma"] == ttgir.Layout("#mma", "nvidia_mma", 3, (8, 1), (128, 16))
    assert layouts["#mma1"].tile == (64, 128)
    assert layouts["#mma2"] == ttgir.Layout("#mma2", "nvidia_mma", 2, (1, 8), (16, 64))
    assert layouts["#blocked"] == ttgir.Layout("#blocked", "blocked", 0, (8, 1), (16, 128))


def test_ttgir_dots_and_their_replication():
    dots = ttgir.dots(TTGIR)  # the warp_group_dot_wait is no product
    assert [(d.op, d.shape, d.layout.name, d.replication) for d in dots] == [
        ("ttng.warp_group_dot", (64, 32), "#mma", 2),  # 128 rows of warps for 64 rows of scores
        ("ttng.warp_group_dot", (64, 128), "#mma1", 1),  # 4 x 16 rows, 2 x 64 columns: exactly the tile
        ("tt.dot", (32, 16), "#mma2", 4),  # 8 warps x 8 columns for 16 columns
        ("tt.dot", (16, 16), "#blocked", 8),  # 16 x 128 elements a pass for 16 x 16
    ]
    assert [d.tensor_core for d in dots] == [True, True, True, False]
    assert dots[0].describe() == "64x32 mma v3 warpsPerCTA=[8, 1] x2"
    assert dots[3].describe() == "16x16 fma warpsPerCTA=[8, 1] x8"
    assert ttgir.replicated(TTGIR) == [dots[0], dots[2], dots[3]]
    fixed = TTGIR.replace(
        "warpsPerCTA = [8, 1], instrShape = [16, 16, 16]", "warpsPerCTA = [4, 1], instrShape = [16, 32, 16]"
    )
    assert ttgir.dots(fixed)[0].replication == 1

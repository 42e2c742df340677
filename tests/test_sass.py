"""The cuobjdump reader of ``metagpt_fast.devtools.sass`` on canned reports (no compiler, no cuobjdump needed)."""

from metagpt_fast.devtools import sass

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

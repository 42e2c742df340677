"""LayerNorm, RMSNorm (with the fused residual add) and bias+GELU on every backend that runs here, against the
reference.

The parity tests are written once per op and run on every (backend, device) of ``kernel_params``: interpreted Triton
at small sizes, the C++ ``cpu`` kernels at odd and model widths in every dtype, compiled Triton on a GPU. Outputs and
every gradient (input, residual, weight, bias) follow the parity rule of ``metagpt_fast.testing`` against the
reference run one precision up. These kernels have no ``tl.dot``, so bfloat16 also runs under the Triton interpreter.

Then: the nn modules (state_dicts both ways with torch's, torch's own results), determinism of the parameter
gradients across thread counts, the registry's reasons (mixed dtypes fall back to the reference) and argument errors.
"""

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_reference, kernel_params, skip_unless_supported

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.ops.reference import bias_gelu as reference_bias_gelu
from metagpt_fast.ops.reference import norms as reference_norms

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_IDS = {F32: "float32", F16: "float16", BF16: "bfloat16"}

# ----------------------------------------------------------------------------------------------------------- cases

# A norm case: the input's leading shape, normalized_shape, dtype, residual, weight, bias (LayerNorm only).


def _norm_case(lead, shape, dtype, residual=False, weight=True, bias=True, layout="contiguous"):
    return dict(lead=lead, shape=shape, dtype=dtype, residual=residual, weight=weight, bias=bias, layout=layout)


def _norm_cases(rows):
    cases = {}
    for case in rows:
        name = (f"{'x'.join(map(str, case['lead']))}-{'x'.join(map(str, case['shape']))}-{DTYPE_IDS[case['dtype']]}"
                f"{'-res' if case['residual'] else ''}{'' if case['weight'] else '-noweight'}"
                f"{'' if case['bias'] else '-nobias'}-{case['layout']}")  # fmt: skip
        cases[name] = case
    return cases


NORM_CASES = {
    # Interpreted Triton: odd widths (61, 1001: a partly masked block), residual, no affine, fp32 and fp16.
    ("triton", "cpu"): _norm_cases(
        [_norm_case((3, 5), (61,), dtype, residual=residual) for dtype in (F32, F16) for residual in (False, True)]
        + [
            _norm_case((4,), (1001,), F32, residual=True),
            _norm_case((2, 3), (4, 5), F32, weight=False, bias=False),
            _norm_case((7,), (61,), F16, bias=False, layout="strided"),
            _norm_case((3, 5), (61,), BF16, residual=True),
        ]
    ),
    # C++ kernels: odd and model widths, every dtype, residual, strided input, multi-dim normalized_shape.
    ("cpu", "cpu"): _norm_cases(
        [
            _norm_case(lead, shape, dtype, residual=residual)
            for lead, shape in (((3, 5), (61,)), ((9,), (1001,)), ((2, 3), (768,)))
            for dtype in (F32, BF16, F16)
            for residual in (False, True)
        ]
        + [
            _norm_case((2, 3), (4, 5), F32, weight=False, bias=False),
            _norm_case((70,), (61,), F32, bias=False, layout="strided"),  # more rows than gradient blocks
            _norm_case((5,), (1,), F32, residual=True),
        ]
    ),
    # Compiled Triton at model widths.
    ("triton", "cuda"): _norm_cases(
        [
            _norm_case(lead, shape, dtype, residual=residual)
            for lead, shape in (((4, 1000), (768,)), ((3, 17), (4096,)), ((2049,), (61,)))
            for dtype in (F32, BF16, F16)
            for residual in (False, True)
        ]
    ),
}

GELU_CASES = {
    ("triton", "cpu"): {
        f"{m}x{n}-{DTYPE_IDS[dtype]}-{approx}{'' if bias else '-nobias'}": (m, n, dtype, approx, bias)
        for m, n, dtype, bias in ((5, 61, F32, True), (7, 33, F16, True), (3, 17, F32, False), (4, 61, BF16, True))
        for approx in ("none", "tanh")
    },
    ("cpu", "cpu"): {
        f"{m}x{n}-{DTYPE_IDS[dtype]}-{approx}{'' if bias else '-nobias'}": (m, n, dtype, approx, bias)
        for m, n in ((5, 61), (70, 1001), (9, 3072))
        for dtype in (F32, BF16, F16)
        for approx in ("none", "tanh")
        for bias in (True, False)
        if bias or n == 61
    },
    ("triton", "cuda"): {
        f"{m}x{n}-{DTYPE_IDS[dtype]}-{approx}": (m, n, dtype, approx, True)
        for m, n in ((4096, 3072), (333, 1001))
        for dtype in (F32, BF16, F16)
        for approx in ("none", "tanh")
    },
}


def _norm_inputs(case, device, rms):
    """(input, residual, weight, bias) in float32, residual/weight/bias None where the case has none."""
    shape = (*case["lead"], *case["shape"])
    if case["layout"] == "strided":  # every other row of a wider tensor
        x = torch.randn(shape[0] * 2, *shape[1:], device=device)[::2]
    else:
        x = torch.randn(shape, device=device)
    residual = torch.randn(shape, device=device) if case["residual"] else None
    weight = 1 + 0.5 * torch.randn(case["shape"], device=device) if case["weight"] else None
    bias = torch.randn(case["shape"], device=device) if case["bias"] and not rms else None
    return x, residual, weight, bias


def _check_norm(op, backend, device, case):
    rms = op == "rms_norm"
    dtype = case["dtype"]
    x, residual, weight, bias = _norm_inputs(case, device, rms)
    eps = 1e-5 if not rms else None
    extra = {} if rms else {"bias": None if bias is None else bias.to(dtype)}
    impl = skip_unless_supported(
        op, backend, input=x.to(dtype), normalized_shape=case["shape"], weight=None if weight is None else
        weight.to(dtype), eps=eps if eps is not None else torch.finfo(dtype).eps, residual=None if residual is None
        else residual.to(dtype), **extra,
    )  # fmt: skip
    names = ["input"] + (["residual"] if residual is not None else []) + ["weight"] * (weight is not None)
    names += ["bias"] * (bias is not None)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]

    def call(fn, args):
        it = iter(args)  # the tensors the case has, in order; None for the others
        xi, ri, wi, bi = (next(it) if t is not None else None for t in (x, residual, weight, bias))
        # rms_norm's eps=None is the dtype's eps: fixed to the case's dtype, so the oracle (one precision up) uses it
        e = torch.finfo(dtype).eps if rms else eps
        kwargs = dict(input=xi, normalized_shape=case["shape"], weight=wi, eps=e, residual=ri)
        if not rms:
            kwargs["bias"] = bi
        return fn(**kwargs)

    out_names = ["out"] + (["sum"] if residual is not None else [])
    fast = lambda *args: call(impl.fn, args)  # noqa: E731
    ref = lambda *args: call(getattr(reference_norms, op), args)  # noqa: E731
    check_against_reference(
        fast, ref, [t.to(dtype) for t in tensors], out_names + [f"d{n}" for n in names], device=device
    )


@pytest.mark.parametrize("backend, device, case", kernel_params("layer_norm", NORM_CASES))
def test_layer_norm_matches_reference(backend, device, case):
    _check_norm("layer_norm", backend, device, case)


@pytest.mark.parametrize("backend, device, case", kernel_params("rms_norm", NORM_CASES))
def test_rms_norm_matches_reference(backend, device, case):
    _check_norm("rms_norm", backend, device, case)


@pytest.mark.parametrize("backend, device, case", kernel_params("bias_gelu", GELU_CASES))
def test_bias_gelu_matches_reference(backend, device, case):
    m, n, dtype, approximate, has_bias = case
    x = 2 * torch.randn(m, n, device=device)
    bias = torch.randn(n, device=device) if has_bias else None
    impl = skip_unless_supported(
        "bias_gelu", backend, x=x.to(dtype), bias=None if bias is None else bias.to(dtype), approximate=approximate
    )
    tensors = [x] + ([bias] if has_bias else [])

    def call(fn):
        return lambda xi, bi=None: fn(x=xi, bias=bi, approximate=approximate)

    names = ["out", "dx"] + (["dbias"] if has_bias else [])
    check_against_reference(
        call(impl.fn), call(reference_bias_gelu.bias_gelu), [t.to(dtype) for t in tensors], names, device=device
    )


# ------------------------------------------------------------------------------------------- public ops, modules


def test_reference_matches_torch():
    """The oracle itself: torch's functional ops in float64."""
    x, w, b = torch.randn(4, 61, dtype=torch.float64), torch.randn(61, dtype=torch.float64), torch.randn(61).double()
    torch.testing.assert_close(reference_norms.layer_norm(x, (61,), w, b, 1e-5), F.layer_norm(x, (61,), w, b, 1e-5))
    torch.testing.assert_close(reference_norms.rms_norm(x, (61,), w), F.rms_norm(x, (61,), w))
    for approximate in ("none", "tanh"):
        torch.testing.assert_close(
            reference_bias_gelu.bias_gelu(x, b, approximate), F.gelu(x + b, approximate=approximate)
        )


@pytest.mark.parametrize("backend", helpers.cpu_backend_params("interpreted Triton is covered by the parity tests"))
def test_public_ops_match_torch(backend):
    x, r = torch.randn(3, 7, 61), torch.randn(3, 7, 61)
    w, b = torch.randn(61), torch.randn(61)
    torch.testing.assert_close(metagpt_fast.layer_norm(x, [61], w, b, backend=backend), F.layer_norm(x, [61], w, b))
    out, total = metagpt_fast.layer_norm(x, 61, w, b, 1e-3, residual=r, backend=backend)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (61,), w, b, 1e-3))
    xb = x.to(BF16)  # eps=None: bfloat16's machine epsilon, as torch
    torch.testing.assert_close(metagpt_fast.rms_norm(xb, (7, 61), backend=backend), F.rms_norm(xb, (7, 61)))
    torch.testing.assert_close(
        metagpt_fast.bias_gelu(x, b, "tanh", backend=backend), F.gelu(x + b, approximate="tanh"), rtol=1e-5,
        atol=1e-5,
    )  # fmt: skip


def test_modules_load_torch_state_dicts_both_ways():
    for ours, theirs in (
        (metagpt_fast.nn.LayerNorm(61), torch.nn.LayerNorm(61)),
        (metagpt_fast.nn.LayerNorm((3, 61), bias=False, backend="reference"), torch.nn.LayerNorm((3, 61), bias=False)),
        (metagpt_fast.nn.LayerNorm(61, elementwise_affine=False), torch.nn.LayerNorm(61, elementwise_affine=False)),
        (metagpt_fast.nn.RMSNorm(61, eps=1e-6), torch.nn.RMSNorm(61, eps=1e-6)),
        (metagpt_fast.nn.RMSNorm([3, 61]), torch.nn.RMSNorm([3, 61])),
    ):
        assert isinstance(ours, type(theirs))
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
        ours.load_state_dict(theirs.state_dict())
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        x = torch.randn(2, 3, 61)
        torch.testing.assert_close(ours(x), theirs(x))
        theirs.load_state_dict(ours.state_dict())
        residual = torch.randn(2, 3, 61)
        out, total = ours(x, residual)
        torch.testing.assert_close(out, theirs(x + residual))
        torch.testing.assert_close(total, x + residual)


@pytest.mark.skipif(not helpers.implements("layer_norm", "cpu"), reason="cpu has no layer_norm")
def test_cpu_parameter_gradients_do_not_depend_on_thread_count():
    x = torch.randn(333, 257, requires_grad=True)
    w, b = torch.randn(257, requires_grad=True), torch.randn(257, requires_grad=True)
    g = torch.randn(333, 257)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = metagpt_fast.layer_norm(x, 257, w, b, backend="cpu")
            results.append(torch.autograd.grad(out, (x, w, b), g))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            assert torch.equal(a, c)


@pytest.mark.skipif(not helpers.implements("layer_norm", "cpu"), reason="cpu has no layer_norm")
def test_mixed_dtypes_fall_back_to_the_reference():
    x, w = torch.randn(4, 61, dtype=BF16), torch.randn(61)
    reasons = backends.explain("layer_norm", input=x, normalized_shape=(61,), weight=w, bias=None, eps=1e-5,
                               residual=None)  # fmt: skip
    assert any("weight has dtype torch.float32" in r for r in reasons["cpu"])
    out = metagpt_fast.layer_norm(x, 61, w)  # auto: the reference
    assert out.dtype == BF16
    torch.testing.assert_close(out, F.layer_norm(x.float(), (61,), w).to(BF16))
    with pytest.raises(ValueError, match="weight has dtype"):
        metagpt_fast.layer_norm(x, 61, w, backend="cpu")
    with pytest.raises(ValueError, match="bias has dtype"):
        metagpt_fast.bias_gelu(x, torch.randn(61), backend="cpu")


@pytest.mark.slow
@pytest.mark.skipif(not helpers.implements("layer_norm", "cpu"), reason="cpu has no layer_norm")
def test_cpu_custom_ops_pass_opcheck():
    ops = torch.ops.metagpt_fast
    x, r = torch.randn(5, 13, requires_grad=True), torch.randn(5, 13, requires_grad=True)
    w, b = torch.randn(13, requires_grad=True), torch.randn(13, requires_grad=True)
    torch.library.opcheck(ops.norm_forward.default, (x, r, w, b, 1e-5, False))
    torch.library.opcheck(ops.norm_forward.default, (x, None, w, None, 1e-6, True))
    torch.library.opcheck(ops.bias_gelu.default, (x, b, True))


def test_empty_inputs():
    x = torch.randn(0, 61, requires_grad=True)
    assert metagpt_fast.layer_norm(x, 61, torch.ones(61)).shape == (0, 61)
    assert metagpt_fast.rms_norm(x, 61, residual=torch.randn(0, 61))[1].shape == (0, 61)
    assert metagpt_fast.bias_gelu(x, torch.ones(61)).shape == (0, 61)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda x: metagpt_fast.layer_norm(x, 60), "normalized_shape"),
        (lambda x: metagpt_fast.layer_norm(x, "61"), "normalized_shape"),
        (lambda x: metagpt_fast.layer_norm(x, 61, torch.ones(60)), "weight"),
        (lambda x: metagpt_fast.layer_norm(x, 61, None, torch.ones(2, 61)), "bias"),
        (lambda x: metagpt_fast.layer_norm(x, 61, eps=-1.0), "eps"),
        (lambda x: metagpt_fast.layer_norm(x, 61, residual=torch.ones(3, 61)), "residual"),
        (lambda x: metagpt_fast.layer_norm(x, 61, residual=x.double()), "residual"),
        (lambda x: metagpt_fast.layer_norm(x.long(), 61), "input"),
        (lambda x: metagpt_fast.rms_norm(x, 61, eps=float("nan")), "eps"),
        (lambda x: metagpt_fast.rms_norm(x, (2, 61)), "normalized_shape"),
        (lambda x: metagpt_fast.bias_gelu(x, torch.ones(60)), "bias"),
        (lambda x: metagpt_fast.bias_gelu(x, torch.ones(61), approximate="erf"), "approximate"),
        (lambda x: metagpt_fast.bias_gelu(x.int(), None), "x"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(torch.randn(4, 61))


# -------------------------------------------------------------------------------------------------------- optimize


def test_optimize_swaps_torch_norms_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(8, 61), torch.nn.LayerNorm(61), torch.nn.RMSNorm(61, eps=1e-6))
    with torch.no_grad():
        model[1].weight.normal_()
        model[2].weight.normal_()
    x = torch.randn(3, 8)
    expected = model(x)
    ln, weight = model[1], model[1].weight
    same, report = metagpt_fast.optimize(model, report=True)
    assert same is model and model[1] is ln and model[1].weight is weight  # same objects, parameters shared
    assert type(model[1]) is metagpt_fast.nn.LayerNorm and type(model[2]) is metagpt_fast.nn.RMSNorm
    assert ("1", "torch.nn.LayerNorm", "metagpt_fast.nn.LayerNorm") in report.swapped
    assert ("2", "torch.nn.RMSNorm", "metagpt_fast.nn.RMSNorm") in report.swapped
    torch.testing.assert_close(model(x), expected)


@pytest.mark.slow  # importing transformers takes seconds
def test_optimize_swaps_hugging_face_rms_norms():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=61, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_()
    idx = torch.randint(0, 64, (2, 9))
    expected = model(idx).logits
    norm_cls = type(model.model.norm)
    _, report = metagpt_fast.optimize(model, report=True)
    swapped = [old for _, old, new in report.swapped if new.endswith(f"Fused{norm_cls.__name__}")]
    assert len(swapped) == 3 and isinstance(model.model.norm, norm_cls)  # input, post-attention and final norms
    assert model.model.norm.backend is None
    torch.testing.assert_close(model(idx).logits, expected, rtol=1e-4, atol=1e-4)


def test_optimize_leaves_other_rms_norm_variants_alone():
    class GemmaLikeRMSNorm(torch.nn.Module):  # (1 + weight), as Gemma's
        def __init__(self, dim):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.zeros(dim)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = torch.nn.Sequential(GemmaLikeRMSNorm(16))
    _, report = metagpt_fast.optimize(model, report=True)
    assert type(model[0]) is GemmaLikeRMSNorm and not report.swapped
    assert "not weight * x / rms(x)" in report.skipped[0][1]


@helpers.interpreted_triton("layer_norm")
def test_triton_refuses_rows_wider_than_a_program_holds():
    from metagpt_fast.kernels.triton import norms as triton_norms

    width = triton_norms.MAX_FEATURES + 1
    x = torch.randn(2, width)
    reasons = backends.explain("layer_norm", input=x, normalized_shape=(width,), weight=None, bias=None, eps=1e-5,
                               residual=None)  # fmt: skip
    assert any("normalized width up to" in r for r in reasons["triton"])
    assert not backends.explain("rms_norm", input=x[:, :61], normalized_shape=(61,), weight=None, eps=1e-5,
                                residual=None)["triton"]  # fmt: skip


@pytest.mark.parametrize("backend", [b for b in helpers.AVAILABLE_BACKENDS if helpers.device_for(b) == "cpu"])
def test_strided_parameters(backend):
    """Weight, bias and residual as strided views: every backend reads them through their strides."""
    x, r = torch.randn(3, 61), torch.randn(61, 3).t()
    w, b = torch.randn(122)[::2], torch.randn(61, 2)[:, 1]
    with helpers.backend_or_skip(backend):
        out, total = metagpt_fast.layer_norm(x, 61, w, b, residual=r)
        gelu = metagpt_fast.bias_gelu(x, b, "tanh")
    torch.testing.assert_close(out, F.layer_norm(x + r, (61,), w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(gelu, F.gelu(x + b, approximate="tanh"), rtol=1e-5, atol=1e-5)

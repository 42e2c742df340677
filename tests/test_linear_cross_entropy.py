"""linear_cross_entropy (the LM head's loss without its logits) on every backend that runs here, against the reference.

The parity test is written once and runs on every (backend, device) the registry reports (``kernel_params``): the
Triton row kernel (interpreted on CPU tensors, compiled on CUDA ones) and the compiled extension's ``cpu`` kernel.
The loss and the gradients of ``hidden``, ``weight`` and ``bias`` follow the parity rule of ``metagpt_fast.testing``
against the reference (F.linear + F.cross_entropy on the whole logits) run one precision up, for a random upstream
gradient (so the reduced losses' gradients are scaled, and reduction none's recomputed with per-row factors). The
loss is float32 from any input dtype, so for 16-bit inputs its oracle is the float64 run.
The row kernel has no ``tl.dot``, so bfloat16 runs under the interpreter too.

Then: argument errors (bad targets), the path of ``loss.backward()`` (a loss gradient of exactly 1), the peak memory
of the chunked backends, the backends' own machinery (opcheck, reasons, chunk sizes).
"""

import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params, kernel_params, requires_cuda, skip_unless_supported

import metagpt_fast
import metagpt_fast.nn
from metagpt_fast import _extension
from metagpt_fast.bench.memory import peak_memory
from metagpt_fast.ops import reference
from metagpt_fast.testing import assert_parity, grad_leaves, max_error, oracle_dtype, outputs_and_grads

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_IDS = {F32: "float32", F16: "float16", BF16: "bfloat16"}

# ------------------------------------------------------------------------------------------------------- cases

# A case: rows (an int N, or a tuple: hidden (*rows, d) with targets of that shape), V, d, dtype, reduction, label
# smoothing, softcap, bias, chunk_size (None: the backend's default), ignore_index and the share of rows ignored,
# and the scale of the weight (logits of standard deviation about scale * sqrt(d)); slow: in the slow tier only.


def _case(rows, vocab, d, dtype, reduction="mean", smoothing=0.0, softcap=None, bias=False, chunk=None,
          ignore_index=-100, ignored=0.2, scale=0.1, slow=False):  # fmt: skip
    return dict(rows=rows, vocab=vocab, d=d, dtype=dtype, reduction=reduction, label_smoothing=smoothing,
                softcap=softcap, bias=bias, chunk_size=chunk, ignore_index=ignore_index, ignored=ignored,
                scale=scale, slow=slow)  # fmt: skip


def _cases(rows):
    cases = {}
    for row in rows:
        c = _case(*row[:4], **(row[4] if len(row) > 4 else {}))
        name = (f"{'x'.join(map(str, c['rows'])) if isinstance(c['rows'], tuple) else c['rows']}-V{c['vocab']}-"
                f"d{c['d']}-{DTYPE_IDS[c['dtype']]}-{c['reduction']}-ls{c['label_smoothing']}-cap{c['softcap']}-"
                f"{'bias' if c['bias'] else 'nobias'}-chunk{c['chunk_size']}-ign{c['ignore_index']}:{c['ignored']}-"
                f"w{c['scale']}")  # fmt: skip
        cases[name] = c
    return cases


def _every_feature(rows, vocab, d, chunk, dtypes):
    """Each reduction with and without the optional features, in each dtype, with chunks that do not divide the
    rows."""
    return [
        (rows, vocab, d, dtype, dict(reduction=reduction, chunk=chunk, **features))
        for dtype in dtypes
        for reduction in ("mean", "sum", "none")
        for features in ({}, dict(smoothing=0.1, softcap=30.0, bias=True))
    ]


LCE_CASES = {
    # Interpreted Triton: one program per row, blocks of 1024 logits (so V=5003 spans 5 of them). The quick tier
    # takes float32 with every feature; without them, and bfloat16: slow.
    ("triton", "cpu"): _cases(
        [
            (*row[:4], dict(row[4], slow=len(row[4]) == 2 or row[3] == BF16))
            for row in _every_feature(13, 5003, 61, 5, (F32, BF16))
        ]
        + [
            (7, 700, 33, F16, dict(reduction="mean", smoothing=0.2, bias=True, chunk=3)),
            ((2, 5), 700, 16, F32, dict(reduction="none", ignore_index=3, chunk=4)),  # a class id as ignore_index
            (9, 300, 24, F32, dict(reduction="sum", softcap=5.0, scale=1.0)),  # logits ~ 5: the cap bites
            (6, 257, 8, F32, dict(reduction="mean", ignored=1.0)),  # every row ignored: NaN, as torch
        ]
    ),
    # Compiled Triton at a GPT-2 head's size, and odd ones.
    ("triton", "cuda"): _cases(
        [
            (515, 50257, 768, dtype, dict(reduction=r, bias=r == "sum"))
            for dtype in (BF16, F16, F32)
            for r in ("mean", "sum", "none")
        ]  # fmt: skip
        + _every_feature(77, 5003, 61, 16, (F32, BF16))
    ),
    # C++: the same features; bfloat16 / float16 rows through the float32 row buffer.
    ("cpu", "cpu"): _cases(
        _every_feature(37, 5003, 61, 8, (F32, BF16))
        + [
            (37, 5003, 61, F16, dict(reduction="mean", smoothing=0.1, bias=True, chunk=16)),
            ((3, 11), 1000, 40, F32, dict(reduction="none", ignore_index=7, smoothing=0.05)),
            ((3, 11), 1000, 40, BF16, dict(reduction="mean")),  # the default chunk size
            (50, 1000, 32, F32, dict(reduction="sum", softcap=10.0, scale=1.0, chunk=7, bias=True)),
            (64, 2000, 48, F32, dict(reduction="mean", smoothing=1.0, chunk=64)),  # only the smoothed term
            (6, 257, 8, F32, dict(reduction="mean", ignored=1.0)),
            (6, 257, 8, F32, dict(reduction="sum", ignored=1.0, bias=True)),
        ]
    ),
}


def _inputs(case, device):
    """hidden (rows..., d), weight (V, d), bias (V,) or None in float32, and targets (rows...) int64 with the case's
    share of rows set to ignore_index."""
    rows = case["rows"] if isinstance(case["rows"], tuple) else (case["rows"],)
    vocab, d = case["vocab"], case["d"]
    hidden = torch.randn(*rows, d, device=device)
    weight = torch.randn(vocab, d, device=device) * case["scale"]
    bias = torch.randn(vocab, device=device) if case["bias"] else None
    targets = torch.randint(0, vocab, rows, device=device)
    ignored = torch.rand(rows, device=device) < case["ignored"]
    targets = targets.masked_fill(ignored, case["ignore_index"])
    return hidden, weight, bias, targets


def _args(case):
    return {k: case[k] for k in ("ignore_index", "reduction", "label_smoothing", "softcap")}


# ------------------------------------------------------------------------------------------------------ parity


def _params():
    """``kernel_params``, with the ``slow`` mark on the cases that ask for it."""
    return [
        pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow] if p.values[2]["slow"] else p.marks, id=p.id)
        for p in kernel_params("linear_cross_entropy", LCE_CASES)
    ]


@pytest.mark.parametrize("backend, device, case", _params())
def test_linear_cross_entropy_matches_reference(backend, device, case):
    dtype = case["dtype"]
    hidden, weight, bias, targets = _inputs(case, device)
    args = _args(case)
    d = case["d"]
    skip_unless_supported(
        "linear_cross_entropy", backend, hidden=hidden.to(dtype).reshape(-1, d), weight=weight.to(dtype),
        targets=targets.reshape(-1), bias=None if bias is None else bias.to(dtype), chunk_size=case["chunk_size"],
        **args,
    )  # fmt: skip

    def fast(h, w, t, b=None):
        return metagpt_fast.linear_cross_entropy(h, w, t, b, **args, chunk_size=case["chunk_size"], backend=backend)

    inputs = [x.to(dtype) for x in (hidden, weight)] + [targets] + ([bias.to(dtype)] if bias is not None else [])
    names = ["loss", "grad_hidden", "grad_weight"] + (["grad_bias"] if bias is not None else [])
    got = outputs_and_grads(fast, grad_leaves(*inputs), device)
    whole = outputs_and_grads(_reference(args), grad_leaves(*inputs), device)
    chunked = outputs_and_grads(_reference(args, _chunk_of(backend, case)), grad_leaves(*inputs), device)
    up = [x.to(oracle_dtype(dtype)) if x.is_floating_point() else x for x in inputs]
    exact = outputs_and_grads(_reference(args), grad_leaves(*up), device)
    if dtype in (F16, BF16):  # the loss is float32 from any input: its oracle, one precision up, is float64's
        up64 = [x.double() if x.is_floating_point() else x for x in inputs]
        exact[0] = outputs_and_grads(_reference(args), grad_leaves(*up64), device)[0]
    for name, f, w, c, e in zip(names, got, whole, chunked, exact, strict=True):
        # The reference's own error: the larger of its whole and its chunked run (see _reference).
        assert_parity(f, max((w, c), key=lambda r: max_error(r, e)), e, name=name)


def _chunk_of(backend, case):
    """The rows per chunk the backend takes for the case."""
    if case["chunk_size"] is not None:
        return case["chunk_size"]
    rows = math.prod(case["rows"]) if isinstance(case["rows"], tuple) else case["rows"]
    if backend == "cpu":
        from metagpt_fast.backends.compiled.linear_cross_entropy import default_chunk_size

        return default_chunk_size(rows, case["vocab"])
    from metagpt_fast.backends.triton.linear_cross_entropy import default_chunk_size

    return default_chunk_size(rows, case["vocab"], case["d"])


def _reference(args, chunk=None):
    """The reference, or (``chunk`` rows) the reference on each chunk of rows with the losses combined as the
    reduction says.

    The chunked run measures what the backends' chunked products cost in the same precision: a product of a few
    rows goes through another BLAS kernel than the whole (N, V) x (V, d) one, with other sums (OpenBLAS's small-M
    path was 6x further from float64 on 5-row chunks of a V = 5003 product than on the whole, 8.0e-7 against 1.3e-7).
    The rule then holds the kernel to twice the larger of the two errors."""

    def run(h, w, t, b=None):
        if chunk is None:
            return reference.linear_cross_entropy(h, w, t, b, **args)
        hidden, targets = h.reshape(-1, h.shape[-1]), t.reshape(-1)
        per_chunk = dict(args, reduction="none" if args["reduction"] == "none" else "sum")
        parts = [
            reference.linear_cross_entropy(hidden[i : i + chunk], w, targets[i : i + chunk], b, **per_chunk)
            for i in range(0, hidden.shape[0], chunk)
        ]
        if args["reduction"] == "none":
            return torch.cat(parts).reshape(t.shape)
        total = sum(p.to(torch.promote_types(p.dtype, torch.float32)) for p in parts)
        if args["reduction"] == "mean":
            total = total / (targets != args["ignore_index"]).sum()
        return total.to(h.dtype)

    return run


# ------------------------------------------------------------------------------------------- every backend here


def _small(dtype=F32, bias=True):
    hidden, weight = torch.randn(10, 16, dtype=dtype), torch.randn(30, 16, dtype=dtype)
    targets = torch.randint(0, 30, (10,))
    targets[2] = -100
    return hidden, weight, targets, torch.randn(30, dtype=dtype) if bias else None


@pytest.mark.parametrize("backend", backend_params("linear_cross_entropy"))
@pytest.mark.parametrize("bad", [30, -1, 1000, -101])
def test_targets_out_of_range_raise_value_error_naming_them(backend, bad):
    hidden, weight, targets, bias = _small()
    targets[5] = bad
    with helpers.backend_or_skip(backend), pytest.raises(ValueError, match="targets") as info:
        metagpt_fast.linear_cross_entropy(hidden, weight, targets, bias)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(targets=torch.zeros(10)), TypeError, "targets"),
        (dict(targets=torch.zeros(9, dtype=torch.long)), ValueError, "targets"),
        (dict(weight=torch.randn(30, 15)), ValueError, "hidden"),
        (dict(bias=torch.randn(29)), ValueError, "bias"),
        (dict(weight=torch.randn(30, 16, dtype=torch.float64)), TypeError, "dtype"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    hidden, weight, targets, bias = _small()
    kwargs = {**dict(hidden=hidden, weight=weight, targets=targets, bias=bias), **change}
    with pytest.raises(error, match=match):
        metagpt_fast.linear_cross_entropy(**kwargs)


@pytest.mark.parametrize("backend", backend_params("linear_cross_entropy"))
def test_backward_of_the_plain_loss_and_retained_graph(backend):
    # loss.backward() (a loss gradient of exactly 1: the gradients computed in the forward, returned as they are),
    # then a second backward through the retained graph accumulates the same gradients again, and a scaled loss.
    hidden, weight, targets, bias = _small()
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    reference.linear_cross_entropy(leaves[0], leaves[1], targets, leaves[2]).backward()
    expected = [t.grad.float() for t in leaves]
    with helpers.backend_or_skip(backend):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = metagpt_fast.linear_cross_entropy(h, w, targets, b)
        loss.backward(retain_graph=True)
        first = [t.grad.clone() for t in (h, w, b)]
        (3 * loss).backward()
    for got, again, want in zip(first, (h.grad, w.grad, b.grad), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, 4 * want, atol=4e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params("linear_cross_entropy"))
def test_only_the_gradients_asked_for(backend):
    # A frozen head (weight without grad), no bias, 3-D hidden: hidden's gradient alone; under no_grad, no graph.
    hidden, weight, targets, _ = _small(bias=False)
    hidden3, targets3 = hidden.reshape(2, 5, 16), targets.reshape(2, 5)
    with helpers.backend_or_skip(backend):
        h = hidden3.clone().requires_grad_()
        (grad,) = torch.autograd.grad(metagpt_fast.linear_cross_entropy(h, weight, targets3, reduction="sum"), [h])
        with torch.no_grad():
            plain = metagpt_fast.linear_cross_entropy(hidden3, weight, targets3, reduction="none")
    h64 = hidden3.double().requires_grad_()
    (want,) = torch.autograd.grad(
        reference.linear_cross_entropy(h64, weight.double(), targets3, reduction="sum"), [h64]
    )
    torch.testing.assert_close(grad, want.float(), atol=1e-5, rtol=1e-5)
    assert plain.shape == (2, 5) and plain.grad_fn is None
    torch.testing.assert_close(plain, F.cross_entropy(hidden @ weight.T, targets, reduction="none").reshape(2, 5))


@pytest.mark.parametrize("backend", backend_params("linear_cross_entropy"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_rows_match_torch(backend, reduction):
    # Zero rows never reach a kernel: torch's results (a NaN mean, a 0 sum, an empty per-row loss), zero gradients.
    hidden, weight = torch.randn(2, 0, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    targets = torch.zeros(2, 0, dtype=torch.long)
    with helpers.backend_or_skip(backend):
        loss = metagpt_fast.linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    want = F.cross_entropy(F.linear(hidden, weight).reshape(0, 30), targets.reshape(0), reduction=reduction)
    torch.testing.assert_close(loss, want.reshape(loss.shape), equal_nan=True)
    assert loss.shape == ((2, 0) if reduction == "none" else ())
    loss.sum().backward()
    assert hidden.grad.shape == hidden.shape and torch.equal(weight.grad, torch.zeros_like(weight))


# ------------------------------------------------------------------------------------------------- peak memory


# Interpreted Triton runs the same chunk loop as on a GPU (at 80 s here): it is measured on a GPU only.
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(b, marks=[pytest.mark.gpu, requires_cuda] if b == "triton" else [])
        for b in ("cpu", "triton")
        if helpers.implements("linear_cross_entropy", b) and not (b == "triton" and helpers.TRITON_INTERPRETED)
    ],
)
def test_chunked_backends_hold_one_chunk_of_logits(backend):
    # fwd + bwd at N=512, V=4000 (8 MiB of float32 logits): torch's unfused loss holds several (N, V) tensors at
    # its peak; the chunked backends hold one chunk (64 rows, 1 MiB) plus the (V, d) weight gradient (0.5 MiB).
    device = helpers.device_for(backend)
    hidden, weight = torch.randn(512, 32, device=device), torch.randn(4000, 32, device=device) * 0.1
    targets = torch.randint(0, 4000, (512,), device=device)

    def step(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fn(h, w).backward()
        return h.grad, w.grad

    unfused = peak_memory(lambda: step(lambda h, w: F.cross_entropy(F.linear(h, w), targets)), device)
    fused = peak_memory(
        lambda: step(lambda h, w: metagpt_fast.linear_cross_entropy(h, w, targets, chunk_size=64, backend=backend)),
        device,
    )
    if unfused is None or fused is None:
        pytest.skip("this torch's profiler does not report CPU allocations")
    logits = 512 * 4000 * 4
    assert unfused >= 2 * logits
    assert fused <= logits / 2, f"fused peak {fused} bytes, unfused {unfused}"


# ------------------------------------------------------------------------------------- compiled extension: cpu


@pytest.fixture(scope="module")
def compiled_lce():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the extension cannot exist")
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import linear_cross_entropy

    return linear_cross_entropy


@pytest.mark.parametrize("reduction", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_cpu_opcheck(compiled_lce, reduction):
    hidden, weight, targets, bias = _small()
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, bias.requires_grad_(), None, -100, reduction,
            0.1, 20.0, 4, reduction != 0, reduction != 0, reduction != 0)  # fmt: skip
    torch.library.opcheck(torch.ops.metagpt_fast.linear_cross_entropy.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_op_compiles_fullgraph(compiled_lce, reduction):
    # Inductor traces the op through its fake kernel and the autograd formula (gradients from the forward for a
    # reduced loss, recomputed for reduction none): same loss and gradients as eager.
    hidden, weight, targets, bias = _small()

    def loss(h, w, b):
        out = metagpt_fast.linear_cross_entropy(h, w, targets, b, reduction=reduction, chunk_size=3, backend="cpu")
        return out.sum()

    compiled = torch.compile(loss, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    got = [compiled(*leaves)] + list(torch.autograd.grad(compiled(*leaves), leaves))
    want = [loss(*leaves)] + list(torch.autograd.grad(loss(*leaves), leaves))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_cpu_default_chunk_size(compiled_lce):
    assert compiled_lce.default_chunk_size(4096, 50257) == 512  # 2**25 logits: 128 MiB of float32
    assert compiled_lce.default_chunk_size(10, 50257) == 16
    assert compiled_lce.default_chunk_size(4096, 10**9) == 1


def test_cpu_kernel_checks_targets_itself(compiled_lce):
    # The op checks its targets too (it is callable without the public function's validation).
    hidden, weight, targets, _ = _small(bias=False)
    targets[0] = 30
    with pytest.raises(RuntimeError, match="targets"):
        torch.ops.metagpt_fast.linear_cross_entropy(hidden, weight, targets, None, None, -100, 1, 0.0, 0.0, 4,
                                                    False, False, False)  # fmt: skip


# ------------------------------------------------------------------------------------------- triton, interpreted

interpreted_triton = helpers.interpreted_triton("linear_cross_entropy")


@interpreted_triton
def test_triton_custom_op_passes_opcheck():
    # The fake-tensor and compile checks trace the op without data, which the interpreter cannot run
    # (docs/testing.md): the GPU section below covers them.
    from metagpt_fast.backends.triton import linear_cross_entropy  # noqa: F401  (registers the op)

    hidden, weight, targets, bias = _small()
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, bias.requires_grad_(), None, -100, 1, 0.1,
            20.0, 4, True, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.metagpt_fast.triton_linear_cross_entropy.default, args,
                          test_utils=("test_schema", "test_autograd_registration"))  # fmt: skip


@interpreted_triton
def test_triton_default_chunk_size():
    from metagpt_fast.backends.triton import linear_cross_entropy

    # Liger-Kernel's: about as many logits per chunk as hidden has elements.
    assert linear_cross_entropy.default_chunk_size(4096, 50257, 768) == 64
    assert linear_cross_entropy.default_chunk_size(3, 50257, 768) == 1


# ---------------------------------------------------------------------------------------------- triton on a GPU


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_custom_op_passes_opcheck():
    pytest.importorskip("triton")
    from metagpt_fast.backends.triton import linear_cross_entropy  # noqa: F401

    hidden, weight, targets, bias = (t.cuda() if t is not None else t for t in _small(BF16))
    for reduction in (0, 1):
        args = (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, bias, None, -100,
                reduction, 0.0, 0.0, 4, reduction == 1, reduction == 1, False)  # fmt: skip
        torch.library.opcheck(torch.ops.metagpt_fast.triton_linear_cross_entropy.default, args)


# ------------------------------------------------------------------------------------------------------ module


def test_module_is_the_function_with_its_arguments():
    hidden, weight, targets, bias = _small()
    module = metagpt_fast.nn.LinearCrossEntropy(reduction="sum", label_smoothing=0.1, softcap=20.0, chunk_size=3)
    assert list(module.parameters()) == [] and module.state_dict() == {}
    args = dict(reduction="sum", label_smoothing=0.1, softcap=20.0)
    torch.testing.assert_close(module(hidden, weight, targets, bias), reference.linear_cross_entropy(
        hidden, weight, targets, bias, **args))  # fmt: skip
    assert "label_smoothing=0.1" in repr(module)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(reduction="avg"), "reduction"), (dict(label_smoothing=-0.1), "label_smoothing"),
     (dict(softcap=-1.0), "softcap"), (dict(chunk_size=0), "chunk_size")],
)  # fmt: skip
def test_module_refuses_bad_arguments_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metagpt_fast.nn.LinearCrossEntropy(**kwargs)


# ---------------------------------------------------------------------------------- Hugging Face: patch_loss

HF_VOCAB = 301  # not a power of two, so the chunks and row blocks have ragged ends


def _hf_model(kind: str, **overrides):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=HF_VOCAB, max_position_embeddings=32)
    llama_like = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, attention_dropout=0.0)  # fmt: skip
    config = {
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=HF_VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),  # fmt: skip
        "llama": lambda: transformers.LlamaConfig(**common, **llama_like, tie_word_embeddings=False),
        "gemma2": lambda: transformers.Gemma2Config(**common, **llama_like, final_logit_softcapping=2.0),
        "cohere": lambda: transformers.CohereConfig(**common, **llama_like, logit_scale=0.25),
    }[kind]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def _loss_and_grads(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("kind", ["gpt2", pytest.param("llama", marks=pytest.mark.slow), "gemma2"])
def test_hf_patch_loss_matches_the_unpatched_model(kind):
    # Tied (GPT-2, Gemma 2) and untied (Llama) heads, Gemma 2's final_logit_softcapping; padding labelled -100.
    from metagpt_fast.integrations import hf

    model = _hf_model(kind)
    torch.manual_seed(1)
    input_ids = torch.randint(0, HF_VOCAB, (2, 9))
    labels = input_ids.clone()
    labels[1, 6:] = -100
    batch = dict(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels)
    want, want_grads = _loss_and_grads(model, **batch)
    hf.patch_loss(model)
    try:
        got, got_grads = _loss_and_grads(model, **batch)
        assert got.logits is None  # never materialised
        # float32 both (transformers upcasts the logits): equal up to float32 rounding of differently ordered sums.
        assert got.loss.dtype == want.loss.dtype == torch.float32
        torch.testing.assert_close(got.loss, want.loss)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w)
        # The Trainer's num_items_in_batch (a sum over the tokens of several micro-batches) and shift_labels.
        n = torch.tensor(20)
        fused = model(**batch, num_items_in_batch=n).loss
        shifted = model(input_ids=input_ids, labels=labels, shift_labels=torch.roll(labels, -1, 1)).loss
        assert model(input_ids=input_ids).logits.shape == (2, 9, HF_VOCAB)  # no labels: the model as it was
    finally:
        hf.unpatch_loss(model)
    torch.testing.assert_close(fused, model(**batch, num_items_in_batch=n).loss)
    torch.testing.assert_close(
        shifted, model(input_ids=input_ids, labels=labels, shift_labels=torch.roll(labels, -1, 1)).loss
    )


def test_hf_patch_loss_refuses_logit_scaling():
    from metagpt_fast.integrations import hf

    model = _hf_model("cohere")
    forward = model.forward
    with pytest.raises(ValueError, match="logit scaling"):
        hf.patch_loss(model)
    assert model.forward == forward  # untouched


def test_hf_patch_loss_refuses_another_loss():
    from metagpt_fast.integrations import hf

    model = _hf_model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        hf.patch_loss(model)

"""torch.compile(fullgraph=True) over MetaGPT with every available backend, and torch.library.opcheck on every
custom op of the package (with inputs recorded from real calls of the public ops).

On CPU the Triton backend runs under the interpreter, which cannot run under torch.compile (the interpreter reads
tensor data while tracing; see docs/testing.md): its compile test runs in the GPU suite, and its ops' opcheck leaves out
the fake-tensor and AOT-dispatch checks here.
"""

import pytest
import torch
from helpers import AVAILABLE_BACKENDS, TRITON_INTERPRETED, cpu_backend_params, device_for, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

import metagpt_fast
from metagpt_fast.testing import assert_parity


def compile_params():
    """Backends that run the CPU model here (Triton only under the interpreter, and then skipped)."""
    return cpu_backend_params("interpreted Triton cannot run under torch.compile (GPU suite)")


def tiny_model(backend, positional="sinusoidal", dropout=0.0, device="cpu"):
    torch.manual_seed(0)
    return metagpt_fast.MetaGPT(64, 32, 1, 4, dropout, 32, positional=positional, backend=backend).to(device)


def forward_backward(fn, model, idx, targets):
    model.zero_grad()
    logits, loss = fn(idx, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_compiled_matches_eager(backend, positional, compiler, device="cpu"):
    torch._dynamo.reset()
    model = tiny_model(backend, positional, device=device)
    idx = torch.randint(0, 64, (2, 17), device=device)
    targets = torch.randint(0, 64, (2, 17), device=device)
    expected = forward_backward(model, model, idx, targets)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)  # fullgraph: a graph break is an error
    got = forward_backward(compiled, model, idx, targets)
    assert_parity(got[0], got[0], expected[0], name="logits")
    assert_parity(got[1], got[1], expected[1], name="loss")
    for name in expected[2]:
        assert_parity(got[2][name], got[2][name], expected[2][name], name=name)


@pytest.mark.slow  # Inductor's cold compile of the whole model: about a minute on 2 cores
@pytest.mark.parametrize("backend", compile_params())
def test_metagpt_compiles_fullgraph_inductor(backend):
    check_compiled_matches_eager(backend, "sinusoidal", "inductor")


@pytest.mark.parametrize("backend", compile_params())
def test_metagpt_rotary_compiles_fullgraph(backend):
    # aot_eager traces exactly what inductor traces (dynamo + AOT autograd, fake tensors) without code generation.
    check_compiled_matches_eager(backend, "rotary", "aot_eager")


@pytest.mark.parametrize("backend", compile_params())
def test_metagpt_with_dropout_compiles_fullgraph(backend):
    torch._dynamo.reset()
    model = tiny_model(backend, dropout=0.1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 17))
    logits, loss = compiled(idx, idx)
    loss.backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b in AVAILABLE_BACKENDS])
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_metagpt_compiles_fullgraph_on_gpu(backend, positional):
    check_compiled_matches_eager(backend, positional, "inductor", device="cuda")


# ---- torch.library.opcheck on every custom op, with inputs recorded from the public ops ----


class _Recorder(TorchDispatchMode):
    """Records the first few calls of every ``metagpt_fast::`` op with copies of their arguments."""

    def __init__(self, samples):
        super().__init__()
        self.samples = samples

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "metagpt_fast" and len(self.samples.setdefault(func, [])) < 3:
            copy = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))
            self.samples[func].append(copy)
        return func(*args, **kwargs)


def _exercise_public_ops(backend, device):
    """Calls every public op forward and backward (with and without dropout, masks, GQA, in-place rotary)."""

    def attention(**kw):
        q = torch.randn(2, 4, 17, 16, device=device, requires_grad=True)
        hk = 2 if kw.get("enable_gqa") else 4
        k = torch.randn(2, hk, 23, 16, device=device, requires_grad=True)
        v = torch.randn(2, hk, 23, 16, device=device, requires_grad=True)
        metagpt_fast.scaled_dot_product_attention(q, k, v, backend=backend, **kw).sum().backward()

    padding = (
        torch.arange(23, device=device)[None, None, None, :] < torch.tensor([23, 9], device=device)[:, None, None, None]
    )
    for kw in ({}, {"is_causal": True}, {"dropout_p": 0.2}, {"attn_mask": padding}, {"enable_gqa": True}):
        attention(**kw)
    x = torch.randn(2, 7, 16, device=device, requires_grad=True)
    for p in (0.0, 0.2):
        metagpt_fast.add_positional_encoding(x, 3, p, backend=backend).sum().backward()
        w = torch.randn(11, 16, device=device, requires_grad=True)
        tokens = torch.randint(0, 11, (2, 7), device=device)
        metagpt_fast.embed_positions(tokens, w, 4.0, 0, p, backend=backend).sum().backward()
    q = torch.randn(2, 4, 7, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, device=device, requires_grad=True)
    qr, kr = metagpt_fast.apply_rotary(q, k, backend=backend)
    (qr.sum() + kr.sum()).backward()
    with torch.no_grad():
        metagpt_fast.apply_rotary(q.detach().clone(), k.detach().clone(), inplace=True, backend=backend)


def _recorded_samples():
    samples = {}
    for backend in AVAILABLE_BACKENDS:
        device = device_for(backend)
        if backend == "reference" or (device == "cuda" and not torch.cuda.is_available()):
            continue
        with _Recorder(samples):
            try:
                _exercise_public_ops(backend, device)
            except ValueError as exc:  # an input this backend declares unsupported: the others still record
                if "cannot run" not in str(exc):
                    raise
    return samples


SAMPLES = _recorded_samples() if any(b != "reference" for b in AVAILABLE_BACKENDS) else {}
CUSTOM_OPS = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("metagpt_fast::"))


@pytest.mark.parametrize("name", CUSTOM_OPS or [pytest.param("none", marks=pytest.mark.skip(reason="no custom ops"))])
def test_opcheck(name):
    samples = [(op, s) for op, recorded in SAMPLES.items() if op._schema.name == name for s in recorded]
    if not samples:
        pytest.skip(f"{name} is not called by the public ops on this machine's backends")
    test_utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if TRITON_INTERPRETED and "triton" in name:
        # A triton_op's fake implementation traces its launcher; under the interpreter that launch reads tensor
        # data, which fake tensors do not have (the compile limitation above). The GPU suite runs all four checks.
        test_utils = test_utils[:2]
    for op, (args, kwargs) in samples:
        torch.library.opcheck(op, args, kwargs, test_utils=test_utils)

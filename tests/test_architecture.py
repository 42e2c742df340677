"""The layer rules of docs/architecture.md, checked on the source: kernels are leaves, lower layers never reach up to
the model, the CLI or the package root, and every backend module declares its capabilities through the registry."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from metagpt_fast import backends

PACKAGE = Path(importlib.util.find_spec("metagpt_fast").origin).parent

# layer -> the package modules it may import (prefixes); everything else of metagpt_fast is off limits.
ALLOWED = {
    "kernels": ("metagpt_fast._spec", "metagpt_fast.kernels"),
    "backends": ("metagpt_fast._spec", "metagpt_fast._extension", "metagpt_fast.kernels", "metagpt_fast.backends"),
    "ops": ("metagpt_fast._spec", "metagpt_fast.backends", "metagpt_fast.ops"),
}


def _imports(path: Path) -> list[str]:
    """Every metagpt_fast module ``path`` imports (``from metagpt_fast import x`` counts as ``metagpt_fast.x``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "metagpt_fast":
                names += [f"metagpt_fast.{alias.name}" for alias in node.names]
            else:
                names.append(node.module)
    return [name for name in names if name == "metagpt_fast" or name.startswith("metagpt_fast.")]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downwards(layer):
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports(path):
            if not any(name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED[layer]):
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    source = tmp_path / "k.py"
    source.write_text(
        "from metagpt_fast import model\nimport metagpt_fast.ops.attention\nfrom metagpt_fast._spec import X\n"
    )
    assert _imports(source) == ["metagpt_fast.model", "metagpt_fast.ops.attention", "metagpt_fast._spec"]


def test_spec_is_a_leaf():
    assert _imports(PACKAGE / "_spec.py") == []


def test_every_declared_op_has_a_reference_and_known_devices():
    assert set(backends.ops()) >= {"attention", "embed_positions", "add_positional_encoding", "rotary"}
    for op in backends.ops():
        impls = backends.implementations(op)
        assert impls[0].backend == "reference", op
        for impl in impls:
            assert impl.devices and set(impl.devices) <= set(backends.registry.ANY_DEVICE), (op, impl.backend)


# ------------------------------------------------------------------------------------ capabilities and priorities


def _attention_inputs(**overrides):
    q = torch.randn(1, 2, 4, 16)
    inputs = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.25, enable_gqa=False)
    return {**inputs, **overrides}


def test_generic_reasons_follow_the_capabilities():
    from metagpt_fast.ops.attention import OP

    caps = backends.Capabilities(
        devices=("cuda",), dtypes=(torch.float16,), max_head_dim=8, features=frozenset({"dropout"})
    )
    mask = torch.zeros(4, 4, requires_grad=True)
    text = "; ".join(backends.registry.generic_reasons(OP, "x", caps, _attention_inputs(attn_mask=mask)))
    for expected in ("takes cuda tensors", "supports float16", "head dims up to 8", "additive attn_mask",
                     "attn_mask requires grad"):  # fmt: skip
        assert expected in text, text
    served = backends.Capabilities(devices=("cpu",), features=frozenset({"dropout"}))
    assert backends.registry.generic_reasons(OP, "x", served, _attention_inputs(dropout_p=0.5)) == []
    exact = backends.Capabilities(devices=("cpu",), head_dims=(16, 64))
    v = torch.randn(1, 2, 4, 64)
    assert backends.registry.generic_reasons(OP, "x", exact, _attention_inputs(value=v))  # unequal head dims


def test_register_rejects_a_feature_the_op_does_not_have():
    with pytest.raises(ValueError, match="no features"):
        backends.register("rotary", "cpu", lambda **_: None, backends.Capabilities(devices=("cpu",),
                          features=frozenset({"dropout"})), priority=1)  # fmt: skip


def test_cuda_attention_ranks_below_triton_on_hopper(monkeypatch):
    impl = backends.lookup("attention", "cuda")
    if impl is None:
        pytest.skip("the compiled extension is not loaded")
    triton = 20  # backends/triton/attention.py
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert impl.priority(_attention_inputs()) < triton
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert impl.priority(_attention_inputs()) > triton


def test_auto_prefers_the_reference_where_the_cpu_kernel_measured_slower():
    if backends.available_backends()["cpu"] is not None:
        pytest.skip("the cpu backend is unavailable here")
    from metagpt_fast.backends.compiled.positional import ADD_PE_CPU_MAX_T

    long = torch.randn(1, ADD_PE_CPU_MAX_T, 8, requires_grad=True)
    assert backends.select("add_positional_encoding", x=long, offset=0, dropout_p=0.0).backend == "reference"
    assert backends.select("add_positional_encoding", x=long, offset=0, dropout_p=0.1).backend == "cpu"
    short = torch.randn(1, 16, 8, requires_grad=True)
    assert backends.select("add_positional_encoding", x=short, offset=0, dropout_p=0.0).backend == "cpu"

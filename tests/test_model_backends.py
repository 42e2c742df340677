"""MetaGPT gives the same logits, loss and parameter gradients on every available backend as on the reference."""

import pytest
import torch

import metagpt_fast
from metagpt_fast import MetaGPT
from metagpt_fast.testing import assert_parity

FAST = [name for name, reason in metagpt_fast.available_backends().items() if reason is None and name != "reference"]


def _run(model, idx, backend):
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("backend", FAST or [pytest.param(None, marks=pytest.mark.skip("no fast backend here"))])
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_model_parity_with_reference(backend, positional):
    torch.manual_seed(0)
    # Odd sequence length, head dim 16; dropout 0 so both runs see the same function.
    model = MetaGPT(96, 64, 2, 4, 0.0, 40, positional=positional)
    idx = torch.randint(0, 96, (2, 37))
    ref_logits, ref_loss, ref_grads = _run(model, idx, "reference")
    logits, loss, grads = _run(model, idx, backend)
    assert_parity(logits, ref_logits, ref_logits, name="logits")
    assert_parity(loss, ref_loss, ref_loss, name="loss")
    for name, grad in grads.items():
        assert_parity(grad, ref_grads[name], ref_grads[name], name=f"grad {name}")

"""MetaGPT with its fused training kernels (``fused=True``: LayerNorm with the residual add, bias+GELU, the LM head's
loss through linear_cross_entropy) against the unfused model: the same parameters and state_dict keys, the same loss
curve over 20 optimizer steps in float64, gradients under the parity rule in float32 on every CPU backend."""

import copy

import pytest
import torch
from helpers import cpu_backend_params

import metagpt_fast
from metagpt_fast import MetaGPT, MetaGPTConfig
from metagpt_fast.testing import assert_parity
from metagpt_fast.training import TrainConfig, make_optimizer

VOCAB, SEQ = 61, 24


def tiny(fused: bool, **kwargs) -> MetaGPT:
    torch.manual_seed(0)
    return MetaGPT(VOCAB, 32, 2, 4, 0.0, SEQ, fused=fused, **kwargs)


def batches(n: int, b: int = 2, t: int = 9):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (b, t), generator=gen)
        y = (3 * x + 1) % VOCAB  # a rule the model can learn in a few steps
        y[0, :3] = -1  # ignored targets
        out.append((x, y))
    return out


def loss_curve(model: MetaGPT, steps: int) -> list[float]:
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    losses = []
    for x, y in batches(steps):
        _, loss = model(x, y, return_logits=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_fused_and_unfused_share_parameters_and_state_dicts():
    fused, plain = tiny(True), tiny(False)
    assert MetaGPTConfig().fused and fused.config.fused and not plain.config.fused
    assert list(fused.state_dict()) == list(plain.state_dict())
    for (name, p), (_, q) in zip(fused.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # same initialisation
    plain.load_state_dict(fused.state_dict())
    fused.load_state_dict(plain.state_dict())
    assert isinstance(fused.ln_f, metagpt_fast.nn.LayerNorm) and isinstance(fused.ln_f, torch.nn.LayerNorm)
    assert type(plain.ln_f) is torch.nn.LayerNorm
    assert MetaGPT.from_config(plain.config).config == plain.config


@pytest.mark.slow  # 2 x 20 optimizer steps
def test_fused_loss_curve_matches_unfused_in_float64():
    fused, plain = tiny(True).double(), tiny(False).double()
    a, b = loss_curve(fused, 20), loss_curve(plain, 20)
    assert a[-1] < a[0]  # it trains
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backend_params("interpreted Triton runs the fused ops in tests/test_norms.py"))
def test_fused_gradients_follow_the_parity_rule(backend):
    """One forward/backward in float32 on ``backend`` (the fused path) against the unfused reference model in float32
    (its error) and float64 (the oracle): the loss and every parameter gradient."""
    (x, y), = batches(1)  # fmt: skip
    base = tiny(False, backend="reference")

    def run(model):
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y, return_logits=False)
        assert logits is None
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    fast_model = tiny(True, backend=backend)
    fast_model.load_state_dict(base.state_dict())
    fast, lowp, exact = run(fast_model), run(copy.deepcopy(base)), run(copy.deepcopy(base).double())
    names = ["loss"] + [n for n, _ in base.named_parameters()]
    for name, f, lo, ex in zip(names, fast, lowp, exact, strict=True):
        assert_parity(f, lo, ex, name=name)


def test_return_logits():
    model = tiny(True)
    x, y = batches(1)[0]
    logits, loss = model(x, y)  # default: logits too (unfused loss over them)
    assert logits.shape == (2, 9, VOCAB)
    none, fused_loss = model(x, y, return_logits=False)
    assert none is None and fused_loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, loss)
    assert model(x)[1] is None
    with pytest.raises(TypeError, match="return_logits"):
        model(x, y, return_logits=1)


def test_bad_targets_name_the_argument():
    model = tiny(True)
    x, y = batches(1)[0]
    y[1, 2] = VOCAB
    with pytest.raises(ValueError, match="targets"):
        model(x, y, return_logits=False)
    with pytest.raises(ValueError, match="targets"):
        model(x, y[:, :5], return_logits=False)
    with pytest.raises(TypeError, match="fused"):
        MetaGPTConfig(fused="yes")


def test_train_command_gpt2_small_preset():
    import argparse

    from metagpt_fast.commands import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    cfg = train.model_config(parser.parse_args(["--preset", "gpt2-small", "--seq-len", "64"]))
    assert (cfg.vocab_size, cfg.embed_size, cfg.num_layers, cfg.num_heads) == (50257, 768, 12, 12) and cfg.fused
    cfg = train.model_config(parser.parse_args(["--preset", "gpt2-small", "--layers", "2", "--unfused"]))
    assert (cfg.vocab_size, cfg.num_layers, cfg.fused) == (50257, 2, False)
    assert train.model_config(parser.parse_args([])) == MetaGPTConfig(max_seq_length=128)

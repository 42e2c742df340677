"""Hugging Face transformers: attn_implementation="metagpt_fast" and the fused Llama rotary patch, against
attn_implementation="eager" on tiny random-config GPT-2 and Llama models (logits, loss and every gradient)."""

import contextlib
import copy

import pytest
import torch
from helpers import AVAILABLE_BACKENDS, backend_or_skip

from metagpt_fast.testing import assert_parity

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("metagpt_fast.integrations.hf")

VOCAB, B, T = 64, 2, 11


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


def gpt2_config():
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )


def llama_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def build(config, attn_implementation):
    torch.manual_seed(0)
    config = copy.deepcopy(config)  # from_config records the implementation in the config: one per model
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    return model


def batch(padding):
    ids = torch.randint(0, VOCAB, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
    elif padding == "right":
        mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    # Label t is predicted from position t - 1: after left padding that is a padded (undefined) position.
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return ids, mask, labels


def run(model, ids, mask, labels, dtype):
    model = model.to(dtype)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    logits = out.logits.detach().masked_fill(mask[..., None] == 0, 0.0)  # padded positions are undefined
    return logits, out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def rotary_patched(model_type):
    hf.patch_rotary(model_type)
    try:
        yield
    finally:
        hf.unpatch_rotary(model_type)


def compare(fast_model, eager_model, padding, patch_rotary=None):
    ids, mask, labels = batch(padding)
    with rotary_patched(patch_rotary) if patch_rotary else contextlib.nullcontext():
        logits, loss, grads = run(fast_model, ids, mask, labels, torch.float32)
    # eager in float32: in float64 its additive mask (finfo.min twice) turns left-padded rows into NaN.
    ref_logits, ref_loss, ref_grads = run(eager_model, ids, mask, labels, torch.float32)
    assert_parity(logits, logits, ref_logits, name="logits")
    assert_parity(loss, loss, ref_loss, name="loss")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_parity(grads[name], grads[name], ref_grads[name], name=name)


@pytest.fixture
def attention_calls(monkeypatch):
    seen = []
    fn = hf.scaled_dot_product_attention

    def counting(*args, **kwargs):
        seen.append(kwargs.get("enable_gqa"))
        return fn(*args, **kwargs)

    monkeypatch.setattr(hf, "scaled_dot_product_attention", counting)
    return seen


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_gpt2_matches_eager(backend, padding, attention_calls):
    config = gpt2_config()
    fast, eager = build(config, "metagpt_fast"), build(config, "eager")
    with backend_or_skip(backend):
        compare(fast, eager, padding)
    assert len(attention_calls) == config.n_layer


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("rotary", [False, True], ids=["hf-rope", "fused-rope"])
def test_llama_gqa_matches_eager(backend, padding, rotary, attention_calls, monkeypatch):
    config = llama_config()
    fast, eager = build(config, "metagpt_fast"), build(config, "eager")
    rotary_calls = []
    op = hf.apply_rotary
    monkeypatch.setattr(hf, "apply_rotary", lambda *a, **k: rotary_calls.append(1) or op(*a, **k))
    with backend_or_skip(backend):
        compare(fast, eager, padding, patch_rotary="llama" if rotary else None)
    assert attention_calls == [True] * config.num_hidden_layers  # 4 query heads on 2 kv heads, not repeated
    assert len(rotary_calls) == (config.num_hidden_layers if rotary else 0)


def test_scaled_rope_keeps_transformers_math(monkeypatch):
    """Linear rope scaling changes the angles: the patch must leave those models to transformers' tables."""
    config = llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    fast, eager = build(config, "metagpt_fast"), build(config, "eager")
    calls = []
    monkeypatch.setattr(hf, "apply_rotary", lambda *a, **k: calls.append(1))
    compare(fast, eager, "none", patch_rotary="llama")
    assert calls == []


def test_unpatch_restores_transformers_functions():
    modeling = hf._modeling_module("llama")
    forward, apply = modeling.LlamaRotaryEmbedding.forward, modeling.apply_rotary_pos_emb
    hf.patch_rotary("llama")
    hf.patch_rotary("llama")  # idempotent
    assert modeling.apply_rotary_pos_emb is not apply
    hf.unpatch_rotary("llama")
    assert modeling.LlamaRotaryEmbedding.forward is forward and modeling.apply_rotary_pos_emb is apply


def test_generate_with_cache_matches_eager():
    """Decoding with a KV cache: one query over the cache, no mask, not causal."""
    config = llama_config()
    fast, eager = build(config, "metagpt_fast").eval(), build(config, "eager").eval()
    ids = torch.randint(0, VOCAB, (1, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(fast.generate(ids, **kwargs), eager.generate(ids, **kwargs), rtol=0, atol=0)


def test_softcap_is_rejected():
    with pytest.raises(ValueError, match="softcap"):
        q = torch.randn(1, 2, 3, 4)
        hf.attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_llama_compiles_fullgraph_with_fused_rope():
    """The attention function and the rotary patch trace without graph breaks (aot_eager: no code generation)."""
    torch._dynamo.reset()
    config = llama_config()
    model = build(config, "metagpt_fast")
    ids = torch.randint(0, VOCAB, (B, T))
    with rotary_patched("llama"):
        expected = model(input_ids=ids).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    assert_parity(got, got, expected, name="logits")

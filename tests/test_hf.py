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


def test_negative_softcap_is_rejected():
    with pytest.raises(ValueError, match="softcap"):
        q = torch.randn(1, 2, 3, 4)
        hf.attention_forward(torch.nn.Module(), q, q, q, None, softcap=-30.0)


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


# ---- the integration edge: every argument is honoured or refused, and models that bypass it are refused ----


def t5_config():
    return transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )


@pytest.mark.parametrize("padding", ["none", "right"])
def test_t5_position_bias_matches_eager(padding):
    """T5 passes its relative position bias as ``position_bias=``: it enters the scores and its embedding learns."""
    config = t5_config()
    results = {}
    for impl in ("metagpt_fast", "eager"):
        torch.manual_seed(0)
        model = transformers.AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        ids, mask, _ = batch(padding)
        labels = torch.randint(0, VOCAB, (B, 6), generator=torch.Generator().manual_seed(1))
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = out.logits.detach(), out.loss.detach(), grads
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results["metagpt_fast"], results["eager"]
    assert_parity(logits, logits, ref_logits, name="logits")
    assert_parity(loss, loss, ref_loss, name="loss")
    bias_grads = [name for name in ref_grads if "relative_attention_bias" in name]
    assert len(bias_grads) == 2  # encoder and decoder
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_parity(grads[name], grads[name], ref_grads[name], name=name)


def deepseek_v32_config():
    return transformers.AutoConfig.for_model(
        "deepseek_v32",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        v_head_dim=8,
        qk_nope_head_dim=8,
        index_topk=4,
        index_head_dim=16,
        index_n_heads=2,
        head_dim=8,
        first_k_dense_replace=1,
        max_position_embeddings=64,
    )


def test_sparse_attention_indices_are_refused():
    """DeepSeek-V3.2 attends to the top-k keys it passes as ``indices=``: dense attention would be wrong."""
    try:
        config = deepseek_v32_config()
    except ValueError:  # this transformers has no deepseek_v32
        config = None
    if config is not None:
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="metagpt_fast")
        with pytest.raises(ValueError, match="indices"):
            model(input_ids=torch.randint(0, VOCAB, (1, T)))
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="indices"):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, indices=torch.zeros(1, 5, 2, dtype=torch.long))


@pytest.mark.parametrize(
    "name, value",
    [
        ("softcap", -30.0),
        ("s_aux", torch.zeros(2)),
        ("sinks", torch.zeros(2)),
        ("block_indices", torch.zeros(1, dtype=torch.long)),
        ("cu_seq_lens_q", torch.tensor([0, 5], dtype=torch.int32)),  # without cu_seq_lens_k
        ("max_length_k", 5),  # without cu_seq_lens_*
        ("seq_idx", torch.zeros(1, 5, dtype=torch.int32)),
        ("output_attentions", True),
        ("some_future_argument", 1.0),
    ],
)
def test_arguments_that_change_the_math_are_refused(name, value):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=name):
        hf.attention_forward(torch.nn.Module(), q, q, q, None, **{name: value})


def test_informational_and_unset_arguments_are_accepted():
    q = torch.randn(1, 2, 5, 8)
    expected, _ = hf.attention_forward(torch.nn.Module(), q, q, q, None)
    got, _ = hf.attention_forward(
        torch.nn.Module(),
        q,
        q,
        q,
        None,
        position_ids=torch.arange(5)[None],
        use_cache=True,
        output_attentions=False,
        softcap=None,
        s_aux=None,
        indices=None,
        some_future_argument=None,
        deterministic=True,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_output_attentions_is_refused():
    model = build(llama_config(), "metagpt_fast")
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=torch.randint(0, VOCAB, (1, T)), output_attentions=True)


def test_sliding_window_through_the_mask_matches_eager(attention_calls):
    """Mistral passes ``sliding_window=``; with padding the mask builder hands over the (B, N) padding mask and the
    window runs on the varlen flash-attention op over the unpadded tokens, not through a dense mask."""
    config = transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,  # shorter than the batch: the window matters
    )
    fast, eager = build(config, "metagpt_fast"), build(config, "eager")
    compare(fast, eager, "left")
    assert attention_calls == []  # no dense-mask attention


def test_sliding_window_without_a_mask_runs_the_window():
    """No mask holds the window: the flash-attention op applies it (key j visible from query i when i - 3 < j <= i)."""
    q = torch.randn(1, 2, 5, 8)
    got, _ = hf.attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=3)
    i = torch.arange(5)
    window = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=window).transpose(1, 2)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("model_type", ["bloom", "mpt"])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_models_whose_attention_bypasses_the_interface_are_refused(model_type, padding):
    """BLOOM and MPT accept the name but compute attention themselves: their first forward must fail."""
    sizes = dict(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4, d_model=32, n_heads=4, n_layers=1)
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="metagpt_fast")
    ids, mask, _ = batch(padding)
    with pytest.raises(ValueError, match="AttentionInterface"):
        model(input_ids=ids, attention_mask=mask)


def cohere_config(model_type):
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # large enough that a wrong rotation shows (0.13 in the logits)
    )
    if model_type == "cohere2":
        return transformers.Cohere2Config(
            **sizes, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
        )
    return transformers.CohereConfig(**sizes)


@pytest.mark.parametrize("model_type", ["cohere", "cohere2"])
def test_cohere_interleaved_rotary_patch_matches_eager(model_type, monkeypatch):
    """Cohere rotates interleaved pairs: the patch must fuse that layout, for eager models as well as ours."""
    config = cohere_config(model_type)
    calls = []
    op = hf.apply_rotary
    monkeypatch.setattr(hf, "apply_rotary", lambda *a, **k: calls.append(k.get("interleaved")) or op(*a, **k))
    eager = build(config, "eager")
    for impl in ("eager", "metagpt_fast"):
        compare(build(config, impl), eager, "left", patch_rotary=model_type)
    # Cohere2 rotates in its sliding-window layers only.
    layers = config.num_hidden_layers
    rotary_layers = config.layer_types.count("sliding_attention") if model_type == "cohere2" else layers
    assert calls == [True] * (2 * rotary_layers)  # fused, interleaved, in both models


def test_gptj_rotary_patch_is_refused_and_leaves_gptj_alone():
    """GPT-J's ``apply_rotary_pos_emb(tensor, sin, cos)`` is not the contract the patch reproduces."""
    modeling = hf._modeling_module("gptj")
    forward, apply = modeling.GPTJRotaryEmbedding.forward, modeling.apply_rotary_pos_emb
    config = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=32)
    ids = torch.randint(0, VOCAB, (B, T))
    expected = build(config, "eager")(input_ids=ids).logits
    with pytest.raises(ValueError, match="apply_rotary_pos_emb"):
        hf.patch_rotary("gptj")
    assert modeling.GPTJRotaryEmbedding.forward is forward and modeling.apply_rotary_pos_emb is apply
    torch.testing.assert_close(build(config, "eager")(input_ids=ids).logits, expected, rtol=0, atol=0)

"""MetaGPT: the article's constructor, shapes, errors, GPT-2 init, modules, generation."""

import pytest
import torch

import metagpt_fast
from metagpt_fast import MetaGPT, MetaGPTConfig
from metagpt_fast.nn import CausalSelfAttention, PositionalEncoding, RotaryEmbedding, TokenPositionalEmbedding
from metagpt_fast.ops import reference


def small(**kwargs):
    return MetaGPT(64, 32, 2, 4, 0.0, 16, **kwargs)


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_forward_shapes_and_loss(positional):
    model = small(positional=positional)
    idx = torch.randint(0, 64, (3, 11))
    logits, loss = model(idx)
    assert logits.shape == (3, 11, 64) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 1.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_article_positional_signature_and_state_dict_is_backend_independent():
    model = MetaGPT(100, 32, 2, 4, 0.1, 16)  # MetaGPT(vocab_size, embed_size, num_layers, num_heads, dropout, max_len)
    other = MetaGPT(100, 32, 2, 4, 0.1, 16, backend="reference")
    assert list(model.state_dict()) == list(other.state_dict())
    other.load_state_dict(model.state_dict())
    assert model.lm_head.weight is model.embedding.weight  # tied, as GPT-2


def test_from_config_round_trip():
    cfg = MetaGPTConfig(vocab_size=50, embed_size=24, num_layers=1, num_heads=3, max_seq_length=8, positional="rotary")
    model = MetaGPT.from_config(cfg)
    assert model.config == cfg


def test_causality_future_tokens_do_not_change_past_logits():
    model = small().eval()
    idx = torch.randint(0, 64, (1, 10))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 64
    torch.testing.assert_close(model(idx)[0][:, :7], model(changed)[0][:, :7])


@pytest.mark.parametrize(
    "args,match",
    [
        ((64, 30, 2, 4, 0.0, 16), "divisible by num_heads"),
        ((64, 32, 2, 4, 1.5, 16), "dropout must be in"),
        ((0, 32, 2, 4, 0.0, 16), "vocab_size must be a positive int"),
        ((64, 32, 2, 4, 0.0, 16.5), "max_seq_length must be a positive int"),
    ],
)
def test_constructor_errors(args, match):
    with pytest.raises(ValueError, match=match):
        MetaGPT(*args)


def test_forward_errors_name_the_argument():
    model = small()
    with pytest.raises(ValueError, match="more than max_seq_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must lie in \[0, 64\)"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="idx must lie"):
        model(torch.tensor([[-3, 1]]))
    with pytest.raises(TypeError, match="idx must hold integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="idx must have 2 dimensions"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="backend must be"):
        model.set_backend("gpu")


def test_gpt2_init():
    model = MetaGPT(1000, 256, 4, 4, 0.0, 16)
    assert abs(model.embedding.weight.std().item() - 0.02) < 0.002
    proj = model.blocks[0].attn.c_proj.weight.std().item()
    assert abs(proj - 0.02 / (2 * 4) ** 0.5) < 0.002
    assert torch.count_nonzero(model.blocks[0].mlp.c_fc.bias) == 0


def test_generate_greedy_is_deterministic_and_respects_limits():
    model = small().eval()
    idx = torch.randint(0, 64, (2, 3))
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0)
    assert a.shape == (2, 23) and torch.equal(a, b) and torch.equal(a[:, :3], idx)  # beyond max_seq_length: cropped
    sampled = model.generate(idx, 5, temperature=1.0, top_k=1)
    torch.testing.assert_close(sampled, model.generate(idx, 5, temperature=0))  # top-1 sampling is greedy
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        model.generate(idx, 2, top_k=0)


def test_positional_encoding_module_matches_article_semantics_with_correct_table():
    module = PositionalEncoding(6, 10)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(module(x), x + reference.sinusoidal_table(5, 6))
    torch.testing.assert_close(module(x, offset=3), x + reference.sinusoidal_table(5, 6, 3))
    assert list(module.state_dict()) == []
    with pytest.raises(ValueError, match="exceed max_seq_length"):
        module(torch.randn(1, 11, 6))
    with pytest.raises(ValueError, match="d_model=6"):
        module(torch.randn(1, 3, 5))


def test_token_positional_embedding_and_rotary_modules():
    emb = TokenPositionalEmbedding(20, 8, 12, scale=1.0)
    tokens = torch.randint(0, 20, (2, 7))
    torch.testing.assert_close(emb(tokens), emb.weight[tokens] + reference.sinusoidal_table(7, 8))
    rope = RotaryEmbedding(8, rotary_dim=4)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    expected = reference.apply_rotary(q, k, rotary_dim=4)
    for got, want in zip(rope(q, k), expected, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        RotaryEmbedding(8, rotary_dim=3)


def test_causal_self_attention_matches_manual_computation():
    attn = CausalSelfAttention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.c_attn(x).split(16, dim=-1)
    heads = [t.view(2, 5, 2, 8).transpose(1, 2) for t in (q, k, v)]
    y = torch.nn.functional.scaled_dot_product_attention(*heads, is_causal=True).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(attn(x), attn.c_proj(y))


def test_backend_switch_keeps_outputs():
    model = small().eval()
    idx = torch.randint(0, 64, (2, 9))
    with metagpt_fast.use_backend("reference"):
        expected = model(idx)[0]
    torch.testing.assert_close(model.set_backend("reference")(idx)[0], expected)

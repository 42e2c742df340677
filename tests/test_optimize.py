"""metagpt_fast.optimize: swaps inside torch's transformer modules and article-style models, outputs and gradients
unchanged, state_dicts interchangeable, conservative PositionalEncoding detection."""

import copy
import math
import os

import pytest
import torch
from torch import nn

import metagpt_fast
from metagpt_fast.nn import MultiheadAttention
from metagpt_fast.testing import assert_parity

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The models here hold CPU tensors: Triton serves them only under the interpreter, the cuda backend never.
BACKENDS = [
    name
    for name, reason in metagpt_fast.available_backends().items()
    if reason is None and (name in ("reference", "cpu") or (name == "triton" and INTERPRETED))
]
D, HEADS, VOCAB, T = 16, 2, 50, 9


class PositionalEncoding(nn.Module):
    """The article's module: a float32 sinusoidal table in a buffer, added to (B, T, d_model)."""

    def __init__(self, d_model, max_seq_length):
        super().__init__()
        pe = torch.zeros(max_seq_length, d_model)
        position = torch.arange(0, max_seq_length, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0))

    def forward(self, x):
        return x + self.pe[:, : x.size(1)]


class ArticleModel(nn.Module):
    def __init__(self, positional=PositionalEncoding):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, D)
        self.positional_encoding = positional(D, 32)
        layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens, padding=None):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        x = self.positional_encoding(self.embedding(tokens))
        if padding is None:
            return self.head(self.encoder(x, mask=causal, is_causal=True))
        return self.head(self.encoder(x, src_key_padding_mask=padding))


def run(model, *args):
    out = model(*args)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert_parity(out_a, out_a, out_b, name="output")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert_parity(grads_a[name], grads_a[name], grads_b[name], name=name)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_article_model_outputs_and_gradients_unchanged(backend):
    model = ArticleModel()
    original = copy.deepcopy(model)
    _, report = metagpt_fast.optimize(model, backend=backend, report=True)
    swapped = {name: new for name, _, new in report.swapped}
    assert swapped == {
        "positional_encoding": "metagpt_fast.nn.PositionalEncoding",
        "encoder.layers.0.self_attn": "metagpt_fast.nn.MultiheadAttention",
        "encoder.layers.1.self_attn": "metagpt_fast.nn.MultiheadAttention",
        **{f"encoder.layers.{i}.norm{j}": "metagpt_fast.nn.LayerNorm" for i in (0, 1) for j in (1, 2)},
    }, str(report)
    assert isinstance(model.encoder.layers[0].self_attn, MultiheadAttention)
    tokens = torch.randint(0, VOCAB, (3, T))
    assert_same(run(model, tokens), run(original, tokens))
    padding = torch.arange(T)[None, :] >= torch.tensor([T, 5, 2])[:, None]
    assert_same(run(model, tokens, padding), run(original, tokens, padding))


def test_inference_fast_path_is_switched_off_and_results_agree():
    """Eval + no_grad + a padding mask is where torch's encoder would bypass the attention module (nested tensors)."""
    model = ArticleModel().eval()
    original = copy.deepcopy(model)
    _, report = metagpt_fast.optimize(model, report=True)
    assert set(report.fastpath_disabled) == {"encoder", "encoder.layers.0", "encoder.layers.1"}
    calls = []
    attn = model.encoder.layers[0].self_attn
    forward = attn.forward  # counted without a hook: a hook alone would switch torch's fast path off

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    attn.forward = counting_forward
    tokens = torch.randint(0, VOCAB, (3, T))
    lengths = torch.tensor([T, 5, 2])
    padding = torch.arange(T)[None, :] >= lengths[:, None]
    with torch.no_grad():
        got, expected = model(tokens, padding), original(tokens, padding)
    assert calls, "the swapped attention module was bypassed"
    for b, n in enumerate(lengths.tolist()):  # padded positions are undefined (torch's nested path writes 0)
        assert_parity(got[b, :n], got[b, :n], expected[b, :n], name=f"sequence {b}")


def test_state_dicts_load_both_ways():
    model = ArticleModel()
    before = model.state_dict()
    metagpt_fast.optimize(model)
    assert list(model.state_dict()) == list(before)
    ArticleModel().load_state_dict(model.state_dict())
    model.load_state_dict(ArticleModel().state_dict())


def test_nn_transformer_encoder_decoder():
    model = nn.Transformer(D, HEADS, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32, dropout=0.0)
    original = copy.deepcopy(model)
    _, report = metagpt_fast.optimize(model, report=True)
    assert sorted(name for name, _, new in report.swapped if new != "metagpt_fast.nn.LayerNorm") == [
        "decoder.layers.0.multihead_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.1.multihead_attn",
        "decoder.layers.1.self_attn",
        "encoder.layers.0.self_attn",
    ]
    norms = [name for name, _, new in report.swapped if new == "metagpt_fast.nn.LayerNorm"]
    assert len(norms) == 10  # 2 per encoder layer, 3 per decoder layer, the encoder's and the decoder's final norm
    src, tgt = torch.randn(7, 2, D), torch.randn(5, 2, D)  # sequence-first
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    memory_padding = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])

    def forward(m):
        out = m(
            src,
            tgt,
            tgt_mask=tgt_mask,
            tgt_is_causal=True,
            memory_key_padding_mask=memory_padding,
            src_key_padding_mask=memory_padding,
        )
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    assert_same(forward(model), forward(original))


def test_optimize_is_idempotent_and_reports():
    model = ArticleModel()
    _, first = metagpt_fast.optimize(model, report=True)
    _, second = metagpt_fast.optimize(model, report=True)
    assert len(first.swapped) == 7 and second.swapped == []  # attention x2, positional encoding, LayerNorm x4
    assert "swapped" in str(first) and "encoder.layers.0.self_attn" in str(first)


def test_optimize_returns_the_model_itself():
    """``model = metagpt_fast.optimize(model)`` keeps the model (as torch.compile / ipex.optimize do)."""
    model = ArticleModel()
    assert metagpt_fast.optimize(model) is model
    again, report = metagpt_fast.optimize(model, report=True)
    assert again is model and isinstance(report, metagpt_fast.OptimizeReport)


def test_root_multihead_attention_is_swapped_in_place():
    mha = nn.MultiheadAttention(D, HEADS)
    _, report = metagpt_fast.optimize(mha, backend="reference", report=True)
    assert isinstance(mha, MultiheadAttention) and mha.backend == "reference"
    assert report.swapped == [("", "torch.nn.MultiheadAttention", "metagpt_fast.nn.MultiheadAttention")]


class LearnedPositionalEncoding(nn.Module):
    def __init__(self, d_model, max_seq_length):
        super().__init__()
        self.pe = nn.Parameter(torch.zeros(1, max_seq_length, d_model))

    def forward(self, x):
        return x + self.pe[:, : x.size(1)]


class SequenceFirstPositionalEncoding(PositionalEncoding):
    """Same table, but for (T, B, d) inputs: adds position b to batch row b of a (B, T, d) probe."""

    def forward(self, x):
        return x + self.pe[0, : x.size(0)].unsqueeze(1)


class OtherBasePositionalEncoding(nn.Module):
    def __init__(self, d_model, max_seq_length):
        super().__init__()
        self.d_model, self.max_seq_length = d_model, max_seq_length

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=torch.float)[:, None]
        angle = pos / 500.0 ** (torch.arange(0, self.d_model, 2).float() / self.d_model)
        pe = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)
        return x + pe


@pytest.mark.parametrize(
    "cls, why",
    [
        (LearnedPositionalEncoding, "has parameters"),
        (SequenceFirstPositionalEncoding, "differs from the sinusoidal encoding"),
        (OtherBasePositionalEncoding, "differs from the sinusoidal encoding"),
    ],
)
def test_positional_encoding_lookalikes_are_left_alone(cls, why):
    cls.__name__ = "PositionalEncoding"  # only the behaviour differs from the article's module
    model = ArticleModel(positional=cls)
    _, report = metagpt_fast.optimize(model, report=True)
    assert type(model.positional_encoding) is cls
    assert [name for name, _ in report.skipped] == ["positional_encoding"]
    assert why in report.skipped[0][1]


def test_article_dropout_is_carried_over():
    class WithDropout(PositionalEncoding):
        def __init__(self, d_model, max_seq_length):
            super().__init__(d_model, max_seq_length)
            self.dropout = nn.Dropout(0.25)

        def forward(self, x):
            return self.dropout(super().forward(x))

    WithDropout.__name__ = "PositionalEncoding"
    model = ArticleModel(positional=WithDropout)
    metagpt_fast.optimize(model)
    assert isinstance(model.positional_encoding, metagpt_fast.nn.PositionalEncoding)
    assert model.positional_encoding.dropout == 0.25


def test_reference_modules_of_the_package_are_retargeted():
    model = metagpt_fast.MetaGPT(VOCAB, D, 1, HEADS, 0.0, 16, backend="reference")
    _, report = metagpt_fast.optimize(model, report=True)
    assert model.config.backend == "auto"
    assert all(getattr(m, "backend", None) is None for m in model.modules() if m is not model)
    assert {name for name, old, new in report.retargeted} >= {"embedding", "blocks.0.attn"}
    for backend in BACKENDS:
        metagpt_fast.optimize(model, backend=backend)
        assert all(getattr(m, "backend", backend) == backend for m in model.modules() if m is not model)


def test_unavailable_or_unknown_backend_raises():
    unavailable = [name for name, reason in metagpt_fast.available_backends().items() if reason is not None]
    for name in unavailable:
        with pytest.raises(ValueError, match="unavailable"):
            metagpt_fast.optimize(nn.Linear(2, 2), backend=name)
    with pytest.raises(ValueError, match="backend must be"):
        metagpt_fast.optimize(nn.Linear(2, 2), backend="fastest")

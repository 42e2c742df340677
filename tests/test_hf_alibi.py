"""ALiBi models (BLOOM, MPT) through ``hf.patch_alibi``: the patched attention against the models' own (eager)
attention on tiny random float32 models, logits and every parameter gradient, without padding, with left and
right padding, over a cache, and with a mask the varlen kernel cannot take (written out instead)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("metagpt_fast.integrations.hf")
hf_alibi = pytest.importorskip("metagpt_fast.integrations.hf_alibi")

VOCAB = 61


def config(model_type):
    if model_type == "bloom":  # 6 heads: slopes of the power of two and the extra ones
        return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6)
    return transformers.MptConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, max_seq_len=32)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


@pytest.fixture
def calls(monkeypatch):
    """How many attention calls went to the varlen kernel and how many to the written-out fallback."""
    seen = {"varlen": 0, "dense": 0}
    varlen, dense = hf_alibi.flash_attn_varlen_func, hf_alibi.scaled_dot_product_attention

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(hf_alibi, "flash_attn_varlen_func", counted("varlen", varlen))
    monkeypatch.setattr(hf_alibi, "scaled_dot_product_attention", counted("dense", dense))
    return seen


@pytest.fixture
def patched(calls):
    """Patches a model type for the test, undone after it (the calls of the patch's own probe are not counted)."""
    done = []

    def patch(model_type):
        hf.patch_alibi(model_type)
        done.append(model_type)
        calls.update(varlen=0, dense=0)

    yield patch
    for model_type in done:
        hf.unpatch_alibi(model_type)


def build(model_type, attn_implementation="eager"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(model_type), attn_implementation=attn_implementation)
    return model.train()  # dropout is 0 in these configs


def batch(padding):
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
    elif padding == "right":
        mask[1, -4:] = 0
    elif padding == "hole":  # not a tokenizer's padding: the varlen kernel cannot take it
        mask[0, 4:6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # a padded position predicts nothing
    return dict(input_ids=ids, attention_mask=None if padding == "none" else mask, labels=labels), mask.bool()


def logits_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, expected, keep):
    (logits_g, grads_g), (logits_e, grads_e) = got, expected
    torch.testing.assert_close(logits_g[keep], logits_e[keep], atol=2e-5, rtol=1e-4)  # padded positions: undefined
    assert grads_g.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_g[name], grads_e[name], atol=2e-5, rtol=1e-4, msg=name)


SLOW = pytest.mark.slow
MPT = pytest.param("mpt", marks=SLOW)  # the quick tier runs BLOOM (and MPT once, left-padded)


@pytest.mark.parametrize(
    "model_type, padding",
    [("bloom", "none"), ("bloom", "left"), ("bloom", "right"), ("mpt", "left"),
     pytest.param("mpt", "none", marks=SLOW), pytest.param("mpt", "right", marks=SLOW)],
)  # fmt: skip
def test_patched_alibi_matches_eager(model_type, padding, calls, patched):
    model = build(model_type)
    data, keep = batch(padding)
    expected = logits_and_grads(model, data)
    patched(model_type)
    assert_same(logits_and_grads(model, data), expected, keep)
    assert calls == {"varlen": model.config.num_hidden_layers, "dense": 0}


@pytest.mark.parametrize("model_type", ["bloom", MPT])
def test_a_mask_with_holes_is_written_out(model_type, calls, patched):
    """A mask whose real tokens are not one run per row: the bias and mask written out, as eager computes them
    (BLOOM counts positions over the real tokens, MPT over all of them: both kept)."""
    model = build(model_type)
    data, keep = batch("hole")
    expected = logits_and_grads(model, data)
    patched(model_type)
    assert_same(logits_and_grads(model, data), expected, keep)
    assert calls == {"varlen": 0, "dense": model.config.num_hidden_layers}


@pytest.mark.parametrize("model_type", ["bloom", MPT])
def test_generation_with_a_cache_matches_eager(model_type, calls, patched):
    """Greedy decoding of a left-padded batch: prefill and steps over the cache (bottom-right causal)."""
    model = build(model_type).eval()
    data, _ = batch("left")
    data.pop("labels")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(**data, **kwargs, output_scores=True, return_dict_in_generate=True)
    patched(model_type)
    got = model.generate(**data, **kwargs, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for g, e in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)
    assert calls["varlen"] == 4 * model.config.num_hidden_layers and calls["dense"] == 0


@pytest.mark.parametrize("model_type", ["bloom", MPT])
def test_the_name_serves_patched_alibi_models(model_type, calls, patched):
    """attn_implementation="metagpt_fast": refused until patched, then the patched attention on eager's masks."""
    data, keep = batch("left")
    fast = build(model_type, "metagpt_fast")
    with pytest.raises(ValueError, match="patch_alibi"):
        fast(**data)
    expected = logits_and_grads(build(model_type), data)
    patched(model_type)
    assert_same(logits_and_grads(fast, data), expected, keep)
    assert calls["varlen"] == fast.config.num_hidden_layers


def test_refusals(patched):
    patched("bloom")
    model = build("bloom")
    data, _ = batch("none")
    with pytest.raises(ValueError, match="output_attentions"):
        model(**data, output_attentions=True)


@pytest.mark.parametrize("fn", [hf.patch_alibi, hf.unpatch_alibi])
def test_a_model_type_that_is_not_a_name_is_refused_naming_it(fn):
    with pytest.raises(TypeError, match="model_type"):
        fn(["bloom"])
    with pytest.raises(ValueError if fn is hf.patch_alibi else TypeError, match="model_type"):
        fn("falcon" if fn is hf.patch_alibi else 3)


def test_unpatch_restores_the_models_attention(patched):
    cls = transformers.models.bloom.modeling_bloom.BloomAttention
    original = cls.forward
    patched("bloom")
    assert cls.forward is not original
    hf.unpatch_alibi("bloom")
    assert cls.forward is original


def test_a_forward_the_patch_does_not_reproduce_is_refused(monkeypatch):
    """A patched forward that differs from the module's own on the probe (as modeling code of another transformers
    version would): refused, and the class is left as it was."""

    def wrong(self, *args, **kwargs):
        out, _ = hf_alibi._bloom_forward(self, *args, **kwargs)
        return out + torch.arange(out.shape[-1]) * 1e-3, None  # not a constant: the layer norms would remove it

    cls = transformers.models.bloom.modeling_bloom.BloomAttention
    original = cls.forward
    entry = hf_alibi._MODELS["bloom"]
    monkeypatch.setitem(hf_alibi._MODELS, "bloom", (entry[0], wrong, entry[2]))
    with pytest.raises(ValueError, match="does not match"):
        hf.patch_alibi("bloom")
    assert cls.forward is original and not hf_alibi.is_patched("bloom")


def test_falcon_alibi_is_refused_under_the_name():
    """Falcon computes attention in its own code (and rounds its ALiBi bias to bfloat16 slopes times positions,
    which flash-attn's exact linear bias does not reproduce): not patched, refused on its first forward."""
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       alibi=True, new_decoder_architecture=False, multi_query=False)  # fmt: skip
    with pytest.raises(KeyError, match="metagpt_fast"):  # transformers' own refusal, when building the model
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="metagpt_fast")
    with pytest.raises(ValueError, match="model_type"):
        hf.patch_alibi("falcon")


def test_mpt_attention_without_position_bias_is_its_own(patched, calls):
    """MptAttention takes position_bias=None (no ALiBi): the patched forward runs the varlen kernel without slopes,
    as the module's own forward adds no bias (it crashed reading the slopes of the missing bias)."""
    attention = build("mpt").transformer.blocks[0].attn.eval()
    hidden = torch.randn(2, 7, 48)
    keep = torch.ones(2, 7, 7, dtype=torch.bool).tril()
    keep[0, :, :2] = False  # left padding of row 0
    mask = ~keep[:, None]  # MPT's convention: True where masked
    with torch.no_grad():
        expected, _ = attention(hidden, None, attention_mask=mask)
        patched("mpt")
        got, _ = attention(hidden, None, attention_mask=mask)
    assert calls == {"varlen": 1, "dense": 0}
    rows = keep.any(-1)  # row 0's first queries see no key: undefined in eager
    torch.testing.assert_close(got[rows], expected[rows], atol=2e-5, rtol=1e-4)

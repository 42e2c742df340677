"""Hugging Face models whose attention needs flash-attn's features, with ``attn_implementation="metagpt_fast"``
against ``eager``: sliding windows (Mistral, Qwen2) applied by the flash-attention op without a dense mask,
Gemma 2's logit softcapping (with and without padding), and padding-free packed batches (``position_ids`` that
restart, or the ``cu_seq_lens_*`` keywords of flash_attention_2's data collators) whose attention never crosses a
document boundary. Tiny random models in float32; logits and every parameter gradient.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("metagpt_fast.integrations.hf")
hf_alibi = pytest.importorskip("metagpt_fast.integrations.hf_alibi")

VOCAB = 61
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)  # fmt: skip
WINDOW = 4  # shorter than the sequences: the window matters


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


@pytest.fixture
def calls(monkeypatch):
    """The masks attention_forward receives, and the flash-attention calls it makes."""
    seen = {"masks": [], "flash": 0, "varlen": 0}
    forward, dense, varlen = hf.attention_forward, hf.flash_attn_func, hf.flash_attn_varlen_func
    unpadded = hf_alibi.flash_attn_varlen_func  # padded batches, unpadded by hf_alibi.varlen_attention

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        seen["masks"].append(attention_mask)
        return forward(module, query, key, value, attention_mask, *args, **kwargs)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(hf, "flash_attn_func", counted("flash", dense))
    monkeypatch.setattr(hf, "flash_attn_varlen_func", counted("varlen", varlen))
    monkeypatch.setattr(hf_alibi, "flash_attn_varlen_func", counted("varlen", unpadded))
    transformers.AttentionInterface.register(hf.NAME, attention)
    yield seen
    transformers.AttentionInterface.register(hf.NAME, forward)


def mistral():
    return transformers.MistralConfig(sliding_window=WINDOW, **SIZES)


def qwen2():
    return transformers.Qwen2Config(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=0,
                                    layer_types=["sliding_attention"] * 2, **SIZES)  # fmt: skip


def gemma2():
    return transformers.Gemma2Config(sliding_window=WINDOW, attn_logit_softcapping=2.0, query_pre_attn_scalar=8,
                                     **SIZES)  # fmt: skip


def gemma3():
    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip("this transformers has no Gemma 3")
    return transformers.Gemma3TextConfig(sliding_window=WINDOW, query_pre_attn_scalar=8,
                                         layer_types=["sliding_attention", "full_attention"], **SIZES)  # fmt: skip


def starcoder2():
    if not hasattr(transformers, "Starcoder2Config"):
        pytest.skip("this transformers has no Starcoder2")
    sizes = {k: v for k, v in SIZES.items() if k != "head_dim"}  # head_dim = hidden_size / heads = 8
    return transformers.Starcoder2Config(sliding_window=WINDOW, **sizes)


CONFIGS = {"mistral": mistral, "qwen2": qwen2, "gemma2": gemma2, "gemma3": gemma3, "starcoder2": starcoder2}
# Layers that run on the flash-attention op: the sliding ones and every layer of a softcapped model (Gemma 2);
# Gemma 3's full layers are plain causal attention (transformers' mask, or none). Padded, the same layers get the
# (B, N) padding mask instead of a dense one and run unpadded on the varlen op.
FLASH_LAYERS = {"mistral": 2, "qwen2": 2, "gemma2": 2, "gemma3": 1, "starcoder2": 2}


def build(config, attn_implementation):
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.train()  # dropout is 0 in these configs; train mode so nothing takes an inference-only path


def pair(make):
    config = make()
    fast, eager = build(config, "metagpt_fast"), build(config, "eager")
    fast.load_state_dict(eager.state_dict())
    return fast, eager


def loss_and_grads(model, **batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(fast, eager):
    (logits_f, grads_f), (logits_e, grads_e) = fast, eager
    torch.testing.assert_close(logits_f, logits_e, atol=2e-5, rtol=1e-4)
    assert grads_f.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model", list(CONFIGS))
def test_window_and_softcap_without_a_dense_mask_match_eager(model, calls):
    fast, eager = pair(CONFIGS[model])
    ids = torch.randint(0, VOCAB, (2, 11))
    assert_same(loss_and_grads(fast, input_ids=ids, labels=ids), loss_and_grads(eager, input_ids=ids, labels=ids))
    # Unpadded: the mask builder leaves every window (and causal) mask out; the flash op applies them.
    assert calls["masks"] and all(mask is None for mask in calls["masks"])
    assert calls["flash"] == FLASH_LAYERS[model]


@pytest.mark.parametrize(
    "model, padding",
    [(model, "left") for model in CONFIGS]
    + [("gemma2", "right")]
    + [pytest.param(model, "right", marks=pytest.mark.slow) for model in CONFIGS if model != "gemma2"],
)
def test_padded_batches_match_eager(model, padding, calls):
    """Padding: the sliding layers (and Gemma 2's softcapped ones) get the (B, N) padding mask instead of a dense
    mask, and run on the varlen op over the unpadded tokens, as flash_attention_2 does."""
    fast, eager = pair(CONFIGS[model])
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
    else:
        mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # no padded position predicts a token
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    (logits_f, grads_f), (logits_e, grads_e) = loss_and_grads(fast, **batch), loss_and_grads(eager, **batch)
    keep = mask.bool()  # padded positions differ by convention (0 here, a uniform average in eager)
    torch.testing.assert_close(logits_f[keep], logits_e[keep], atol=2e-5, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], atol=2e-5, rtol=1e-4, msg=name)
    padding_masks = [m for m in calls["masks"] if m is not None and m.dim() == 2]
    assert len(padding_masks) == calls["varlen"] == FLASH_LAYERS[model]
    assert all(m is not None for m in calls["masks"])


DOCS = (5, 1, 7, 3)  # a document of one token, and documents longer than the window


def packed_batch(with_cu_seq_lens: bool):
    ids = torch.randint(0, VOCAB, (1, sum(DOCS)))
    position_ids = torch.cat([torch.arange(n) for n in DOCS])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *DOCS]).cumsum(0)[:-1]
    labels[0, starts] = -100  # transformers shifts labels: no document predicts the first token of the next
    batch = dict(input_ids=ids, position_ids=position_ids, labels=labels)
    if with_cu_seq_lens:  # what DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds
        cu = torch.tensor([0, *DOCS], dtype=torch.int32).cumsum(0).to(torch.int32)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(DOCS), max_length_k=max(DOCS))
    return batch


@pytest.mark.parametrize("with_cu_seq_lens", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("model", ["mistral", "gemma2"])
def test_packed_batch_matches_each_document_alone(model, with_cu_seq_lens, calls):
    """A packed row gives each document's own logits, and the summed loss the per-document losses' gradients."""
    fast, eager = pair(CONFIGS[model])
    batch = packed_batch(with_cu_seq_lens)
    logits, grads = loss_and_grads(fast, **batch)
    assert calls["varlen"] == fast.config.num_hidden_layers
    eager.zero_grad()
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    expected, start = [], 0
    for n in DOCS:
        ids = batch["input_ids"][:, start : start + n]
        out = eager(input_ids=ids)
        expected.append(out.logits.detach())
        if n > 1:  # the packed loss is the mean over every predicted token: weigh each document by its count
            loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum") / n_labels
            loss.backward()
        start += n
    torch.testing.assert_close(logits, torch.cat(expected, dim=1), atol=2e-5, rtol=1e-4)
    for name, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_cu_seq_lens_against_a_mask_that_disagrees_is_refused():
    q = torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()  # one sequence, while cu_seq_lens says two
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        hf.attention_forward(torch.nn.Module(), q, q, q, mask, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    out, _ = hf.attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    first, _ = hf.attention_forward(torch.nn.Module(), q[:, :, :3], q[:, :, :3], q[:, :, :3], None)
    torch.testing.assert_close(out[:, :3], first)


def test_left_padding_in_position_ids_is_not_read_as_packing():
    """One left-padded row: its position_ids restart after the padding, yet the mask (padding) decides."""
    q = torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[..., :2] = False
    position_ids = torch.tensor([[1, 1, 0, 1, 2, 3]])
    got, _ = hf.attention_forward(torch.nn.Module(), q, q, q, mask, position_ids=position_ids)
    expected, _ = hf.attention_forward(torch.nn.Module(), q, q, q, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_windowed_model_compiles_fullgraph():
    """One unpadded row (position_ids not read while compiling): the window runs through the flash op in the graph."""
    torch._dynamo.reset()
    fast, eager = pair(mistral)
    fast.eval(), eager.eval()
    ids = torch.randint(0, VOCAB, (1, 11))
    expected = eager(input_ids=ids).logits
    torch.testing.assert_close(fast(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-4)  # (loads the backends)
    got = torch.compile(fast, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["gemma2", pytest.param("mistral", marks=pytest.mark.slow)])
def test_padded_generation_matches_eager(model, calls):
    """Greedy decoding of a left-padded batch: the prefill unpadded on the varlen op; the steps over the cache get
    transformers' dense mask, which Gemma 2's softcapped layers turn back into varlen sequences (checked entry by
    entry) instead of writing the scores out."""
    fast, eager = pair(CONFIGS[model])
    fast.eval(), eager.eval()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)  # fmt: skip
    expected, got = eager.generate(**kwargs), fast.generate(**kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    for g, e in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)
    steps = 4 if model == "gemma2" else 1  # Mistral's steps: the window through transformers' mask (SDPA)
    assert calls["varlen"] == steps * FLASH_LAYERS[model]


def test_unpad_plan_reads_padding_and_caches_and_refuses_the_rest():
    i, j = torch.arange(5)[:, None], torch.arange(8)[None, :]
    causal = j <= i + 3  # 5 queries after 3 cached keys
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool)
    keep = causal[None] & padding[:, None, :]
    plan = hf_alibi.unpad_plan(keep)
    assert plan is not None and torch.equal(plan.keys, padding) and plan.queries.all()
    assert plan.first_key.tolist() == [2, 0]
    windowed = keep & (j > i + 3 - 2)[None]
    assert hf_alibi.unpad_plan(windowed, window=2) is not None
    assert hf_alibi.unpad_plan(windowed) is None  # the window is not declared: the mask says something else
    hole = keep.clone()
    hole[1, :, 4] = False
    assert hf_alibi.unpad_plan(hole) is None

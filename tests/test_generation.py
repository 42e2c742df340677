"""Generation: the KV-cache path gives exactly the tokens of the no-cache loop (argmax over a full forward at every
step), for both positional modes, ragged batches, float32 and float64; sampling, top-k/top-p, stop tokens, sliding
past max_seq_length, streaming, argument errors, the compiled decode step and the CLI's streamed output."""

import copy
import dataclasses
import io

import pytest
import torch

from metagpt_fast import MetaGPT, checkpoint
from metagpt_fast.cli import main
from metagpt_fast.generation import KVCache, _DecodePlan, decode_step, prefill, sample, stream_generate

VOCAB = 61


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and on a loaded machine a second one waits at every op's barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_for(positional="sinusoidal", dtype=torch.float32, max_seq_length=40, layers=2, seed=0):
    """A small model whose greedy continuations vary: untied head, weights of std 3/sqrt(fan_in) (with GPT-2's init,
    a random model repeats one token, and a test comparing tokens could not fail)."""
    torch.manual_seed(seed)
    model = MetaGPT(VOCAB, 32, layers, 4, 0.0, max_seq_length, positional=positional, tie_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    return model.to(dtype).eval()


def greedy_full_forward(model, prompt, n):
    """The no-cache oracle: ``n`` times, argmax of the logits of a full forward over the row's last
    ``max_seq_length`` tokens."""
    seq = torch.as_tensor(prompt, dtype=torch.long)[None]
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[:, -model.config.max_seq_length :])[0][:, -1]
            seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq[0]


def ragged_prompts(lengths=(7, 1, 12, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_greedy_with_cache_is_the_full_forward_argmax_for_ragged_batches(positional, dtype):
    model = model_for(positional, dtype)
    prompts = ragged_prompts()
    n = 40 - 12  # the longest prompt fills max_seq_length exactly
    got = model.generate(prompts, n, temperature=0)
    no_cache = model.generate(prompts, n, temperature=0, use_cache=False)
    for prompt, row, row_no_cache in zip(prompts, got, no_cache, strict=True):
        expected = greedy_full_forward(model, prompt, n)
        assert len(set(expected[len(prompt) :].tolist())) > 3  # the oracle's tokens vary: the test can fail
        assert torch.equal(row, expected)
        assert torch.equal(row_no_cache, expected)


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_cache_runs_under_autocast(positional):
    """Under bfloat16 autocast the projections come out in bfloat16 while the cache keeps the weights' float32: the
    decode steps cast to the cache (they raised a dtype mismatch before). The first new token comes from the prefill,
    the same bfloat16 forward as the no-cache loop's first step, so the two agree on it."""
    model = model_for(positional)
    prompt = ragged_prompts((9,))[0][None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.generate(prompt, 12, temperature=0)
        no_cache = model.generate(prompt, 1, temperature=0, use_cache=False)
    assert got.shape == (1, 21) and got.dtype == torch.long
    assert torch.equal(got[:, :9], prompt) and int(got.max()) < VOCAB
    assert torch.equal(got[:, : 9 + 1], no_cache)


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_right_padded_tensor_with_lengths_is_the_list_form(positional):
    model = model_for(positional)
    prompts = ragged_prompts((5, 9, 2))
    idx = torch.full((3, 9), 17)
    for i, p in enumerate(prompts):
        idx[i, : len(p)] = p
    lengths = torch.tensor([5, 9, 2])
    out = model.generate(idx, 10, temperature=0, lengths=lengths, pad_token=3)
    listed = model.generate(prompts, 10, temperature=0)
    assert out.shape == (3, 19) and out.dtype == idx.dtype
    for i, row in enumerate(listed):
        assert torch.equal(out[i, : len(row)], row)
        assert (out[i, len(row) :] == 3).all()  # after the row: pad_token (not idx's padding)
    # Equal lengths: a plain (B, T) tensor, the original API.
    same = model.generate(idx, 10, temperature=0)
    assert same.shape == (3, 19) and torch.equal(same[1], out[1])
    assert torch.equal(same[0], greedy_full_forward(model, idx[0], 10))


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_left_padded_prompts_with_an_attention_mask_are_each_prompt_alone(positional):
    """Hugging Face's layout: padding on the left, attention_mask 1 on real tokens. Each row's positions start at its
    first real token, so its greedy tokens are those of the prompt generated alone (batch of one, no padding)."""
    model = model_for(positional)
    prompts = ragged_prompts((5, 9, 1, 9))
    idx = torch.full((4, 9), 17)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, 9 - len(p) :] = p
        mask[i, 9 - len(p) :] = 1
    n = 12
    out = model.generate(idx, n, temperature=0, attention_mask=mask)
    assert out.shape == (4, 9 + n) and out.dtype == idx.dtype
    assert torch.equal(out[:, :9], idx)  # the prompts as given, padding included
    no_cache = model.generate(idx, n, temperature=0, attention_mask=mask.bool(), use_cache=False)
    assert torch.equal(no_cache, out)
    streamed = torch.stack(list(model.stream_generate(idx, n, temperature=0, attention_mask=mask)), dim=1)
    assert torch.equal(streamed, out[:, 9:])
    assert len(set(out[:, 9:].flatten().tolist())) > 3  # the tokens vary: a wrong position would show
    for i, p in enumerate(prompts):
        assert torch.equal(out[i, 9:], model.generate(p[None], n, temperature=0)[0, len(p) :])


@pytest.mark.parametrize(
    "mask,error,match",
    [
        (torch.ones(2, 3, dtype=torch.long), ValueError, "attention_mask must have idx's shape"),
        (torch.ones(2, 4), TypeError, "attention_mask must be a bool or integer tensor"),
        (torch.tensor([[0, 1, 1, 1], [0, 0, 2, 1]]), ValueError, "attention_mask must hold 0"),
        (torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]), ValueError, "attention_mask must describe left padding.*row 1"),
        (torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]]), ValueError, "attention_mask: row 1 has no real token"),
        (torch.ones(4, dtype=torch.long), ValueError, "attention_mask must have 2 dimensions"),
        ([[1, 1, 1, 1], [1, 1, 1, 1]], TypeError, "attention_mask must be a torch.Tensor"),
    ],
)
def test_bad_attention_masks_raise_naming_it(mask, error, match):
    model = model_for()
    idx = torch.randint(0, VOCAB, (2, 4))
    with pytest.raises(error, match=match):
        model.generate(idx, 3, attention_mask=mask)
    with pytest.raises(error, match=match):  # the stream checks before its first step
        model.stream_generate(idx, 3, attention_mask=mask)
    ones = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask: .* not both"):
        model.generate(idx, 3, attention_mask=ones, lengths=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="attention_mask: pass it only with a"):
        model.generate([[1, 2]], 3, attention_mask=ones[:1, :2])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_eager_decode_plan_is_the_module_step(positional, fused):
    """The eager decode step calls the ops directly (no module calls): its logits and cache are decode_step's, bit for
    bit, for fused and unfused blocks."""
    torch.manual_seed(0)
    model = MetaGPT(VOCAB, 32, 2, 4, 0.0, 40, positional=positional, fused=fused).eval()
    plan = _DecodePlan.build(model)
    assert plan is not None
    prompt = ragged_prompts((6, 3))
    idx, lengths = torch.zeros(2, 6, dtype=torch.long), torch.tensor([6, 3], dtype=torch.int32)
    for i, p in enumerate(prompt):
        idx[i, : len(p)] = p
    caches = [KVCache.for_model(model, 2), KVCache.for_model(model, 2)]
    with torch.no_grad():
        tokens = [prefill(model, idx, lengths, c).argmax(-1)[:, None] for c in caches][0]
        for _ in range(4):
            want = decode_step(model, tokens, caches[0])
            got = plan.step(model, tokens, caches[1])
            assert torch.equal(got, want)
            tokens = want.argmax(-1)[:, None]
    for a, b in zip(caches[0].buffers(), caches[1].buffers(), strict=True):
        assert a is None and b is None or torch.equal(a, b)


def test_eager_decode_plan_steps_aside_for_hooks_and_training():
    """A hook on any module of the path, or a module in training mode, keeps the module calls (the hook runs)."""
    model = model_for()
    assert _DecodePlan.build(model) is not None
    calls = []
    handle = model.blocks[1].mlp.c_proj.register_forward_hook(lambda *args: calls.append(1))
    assert _DecodePlan.build(model) is None
    model.generate(ragged_prompts((4,))[0][None], 3, temperature=0)
    assert len(calls) == 1 + 2  # the prefill, then two decode steps
    handle.remove()
    model.blocks[0].ln_1.train()
    assert _DecodePlan.build(model) is None
    model.eval()
    model.blocks[0].attn.forward = model.blocks[0].attn.forward  # an instance forward: could be anything
    assert _DecodePlan.build(model) is None


def test_eager_decode_plan_keeps_the_module_error_of_a_fused_block_with_torch_norms():
    """A fused block whose ln_2 is torch's LayerNorm (no residual argument) fails in its module call; the plan must
    not run it with the residual silently dropped (its unpacking of one tensor as two gave another error)."""
    torch.manual_seed(0)
    model = MetaGPT(VOCAB, 32, 2, 4, 0.0, 40, positional="rotary", fused=True).eval()
    ln = torch.nn.LayerNorm(32).eval()
    ln.load_state_dict(model.blocks[1].ln_2.state_dict())
    model.blocks[1].ln_2 = ln
    assert _DecodePlan.build(model) is None
    with pytest.raises(TypeError, match="positional argument"):
        model.generate(ragged_prompts((4,))[0][None], 2, temperature=0)


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_sliding_past_max_seq_length_is_the_cropping_loop(positional):
    model = model_for(positional, max_seq_length=16)
    prompts = ragged_prompts((5, 11))
    got = model.generate(prompts, 20, temperature=0)  # sliding=True: the original loop's cropping
    for prompt, row in zip(prompts, got, strict=True):
        assert torch.equal(row, greedy_full_forward(model, prompt, 20))


def test_past_max_seq_length_without_sliding_raises_naming_max_new_tokens():
    model = model_for(max_seq_length=16)
    idx = torch.randint(0, VOCAB, (2, 6))
    assert model.generate(idx, 10, temperature=0, sliding=False).shape == (2, 16)  # exactly fits
    with pytest.raises(ValueError, match=r"max_new_tokens=11 .* max_seq_length=16.*at most 10"):
        model.generate(idx, 11, temperature=0, sliding=False)
    with pytest.raises(ValueError, match="max_seq_length"):  # the prompt alone is too long (as before)
        model.generate(torch.zeros(1, 17, dtype=torch.long), 1)


def test_cache_too_small_raises_and_leaves_it_unchanged():
    model = model_for()
    idx = torch.randint(0, VOCAB, (2, 6))
    small = KVCache.for_model(model, 2, max_length=5)
    with pytest.raises(ValueError, match="cache"), torch.no_grad():
        prefill(model, idx, torch.tensor([6, 6], dtype=torch.int32), small)
    cache = KVCache.for_model(model, 2, max_length=6)
    with torch.no_grad():
        prefill(model, idx, torch.tensor([6, 6], dtype=torch.int32), cache)
        before = {name: b.clone() for name, b in cache.named_buffers()}
        with pytest.raises(ValueError, match="cache_seqlens .* exceeds the cache's capacity"):
            decode_step(model, idx[:, :1], cache)
    for name, b in cache.named_buffers():
        assert torch.equal(b, before[name]), name
    with pytest.raises(ValueError, match="cache: it has 2 rows, idx has 1"), torch.no_grad():
        prefill(model, idx[:1], torch.tensor([6], dtype=torch.int32), cache)
    bare = KVCache(2, 2, 8, 4, 8)  # no position table: a sinusoidal model cannot place its tokens
    with pytest.raises(ValueError, match="cache has no position table"), torch.no_grad():
        decode_step(model, idx[:, :1], bare)


def test_sampling_with_a_generator_is_reproducible():
    model = model_for()
    prompts = ragged_prompts((3, 6))

    def draw(seed, **kw):
        return model.generate(prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    no_cache = draw(0, use_cache=False)  # same logits, same draws
    assert all(torch.equal(x, y) for x, y in zip(a, no_cache, strict=True))


def test_top_k_and_top_p_restrict_the_draws():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, 1.0, top_k=2, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.53, 0.20, 0.12, 0.07, 0.03
    top_p = float(probs[0] + probs[1]) - 1e-3  # tokens 0 and 1 reach it: token 2 is cut
    drawn = sample(logits, 1.0, top_p=top_p, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).double().mean().item()  # renormalised over the kept tokens
    assert abs(share - float(probs[0] / (probs[0] + probs[1]))) < 0.03
    assert set(sample(logits, 1.0, top_p=1e-6, generator=g).tolist()) == {0}  # the most likely token always stays
    assert len(set(sample(logits, 1.0, top_p=1.0, generator=g).tolist())) == 5
    model = model_for()
    prompts = ragged_prompts((4, 8))
    greedy = model.generate(prompts, 8, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = model.generate(prompts, 8, temperature=2.0, generator=torch.Generator().manual_seed(0), **kw)
        assert all(torch.equal(x, y) for x, y in zip(sampled, greedy, strict=True))


def test_stop_tokens_end_rows_which_then_keep_padding():
    model = model_for()
    prompts = ragged_prompts((4, 9, 6))
    greedy = model.generate(prompts, 12, temperature=0)
    stop = int(greedy[0][4 + 2])  # row 0's third new token
    first = []  # the step at which each row first emits the stop token, or None
    for p, row in zip(prompts, greedy, strict=True):
        new = row[len(p) :].tolist()
        first.append(new.index(stop) if stop in new else None)
    listed = model.generate(prompts, 12, temperature=0, stop_tokens=stop)
    idx = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, : len(p)] = p
    lengths = torch.tensor([4, 9, 6])
    padded = model.generate(idx, 12, temperature=0, lengths=lengths, stop_tokens=[stop], pad_token=60)
    for i, (p, row) in enumerate(zip(prompts, listed, strict=True)):
        end = len(p) + (12 if first[i] is None else first[i] + 1)
        assert torch.equal(row, greedy[i][:end])  # stops after its stop token, which it keeps
        assert torch.equal(padded[i, :end], row) and (padded[i, end:] == 60).all()
    if all(f is not None for f in first):  # every row stopped: generation ended early
        assert padded.shape[1] < 9 + 12
    # A stop token every row emits at once: one step, then the end.
    out = model.generate(idx[:1, :4], 12, temperature=0, stop_tokens=int(greedy[0][4]))
    assert out.shape == (1, 5)


def test_stream_generate_yields_the_new_tokens_one_step_at_a_time():
    model = model_for("rotary")
    prompts = ragged_prompts((3, 7))
    steps = stream_generate(model, prompts, 6, temperature=0)
    first = next(steps)
    assert first.shape == (2,) and first.dtype == torch.long
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # nothing leaks between steps
    assert not first.is_inference()  # a plain tensor: the caller may modify it in place
    rest = list(steps)
    got = torch.stack([first, *rest], dim=1)
    expected = model.generate(prompts, 6, temperature=0)
    for p, row, new in zip(prompts, expected, got, strict=True):
        assert torch.equal(row[len(p) :], new)
    assert list(model.stream_generate(torch.zeros(1, 3, dtype=torch.long), 0)) == []


def test_generation_runs_in_eval_mode_and_restores_the_training_mode():
    model = model_for()
    model.blocks[0].attn.dropout = 0.5
    model.train()
    prompts = ragged_prompts((5,))
    out = model.generate(prompts, 6, temperature=0)
    assert model.training
    model.eval()
    assert torch.equal(out[0], greedy_full_forward(model, prompts[0], 6))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(temperature=-1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=0), ValueError, "top_k must be >= 1"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p="0.5"), TypeError, "top_p"),
        (dict(stop_tokens=61), ValueError, "stop_tokens"),
        (dict(stop_tokens="a"), TypeError, "stop_tokens"),
        (dict(stop_tokens=[1.0]), TypeError, "stop_tokens"),
        (dict(pad_token=-1), ValueError, "pad_token"),
        (dict(lengths=torch.tensor([3])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([3, 0])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([3, 5])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([3.0, 2.0])), TypeError, "lengths"),
        (dict(generator=0), TypeError, "generator"),
        (dict(use_cache=1), TypeError, "use_cache"),
        (dict(compile=True, use_cache=False), ValueError, "compile"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    model = model_for()
    idx = torch.randint(0, VOCAB, (2, 4))
    n = kwargs.pop("max_new_tokens", 3)
    with pytest.raises(error, match=match):
        model.generate(idx, n, **kwargs)
    with pytest.raises(error, match=match):  # the stream checks before its first step
        model.stream_generate(idx, n, **kwargs)


@pytest.mark.parametrize(
    "prompts,error,match",
    [
        ([], TypeError, "idx"),
        ([[1, 2], []], ValueError, r"idx\[1\] is empty"),
        ([[1, 2], [1.5]], TypeError, r"idx\[1\]"),
        ([torch.zeros(2, 2, dtype=torch.long)], ValueError, r"idx\[0\]"),
        ([[1, 99]], ValueError, "idx must lie in"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "idx"),
        (torch.zeros(2, dtype=torch.long), ValueError, "idx"),
        (torch.zeros(1, 3, dtype=torch.long, device="meta"), ValueError, "idx is on meta"),
    ],
)
def test_bad_prompts_raise_naming_idx(prompts, error, match):
    with pytest.raises(error, match=match):
        model_for().generate(prompts, 2)
    with pytest.raises(ValueError, match="lengths"):
        model_for().generate([[1, 2]], 2, lengths=torch.tensor([2]))


@pytest.mark.slow  # Inductor compiles the decode step: tens of seconds on 2 cores
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_compiled_decode_step_gives_the_eager_tokens(positional):
    torch._dynamo.reset()
    model = model_for(positional, layers=1, max_seq_length=24)
    prompts = ragged_prompts((5, 9))
    expected = model.generate(prompts, 12, temperature=0)
    got = model.generate(prompts, 12, temperature=0, compile=True)
    for x, y in zip(got, expected, strict=True):
        assert torch.equal(x, y)
    graphs = dict(torch._dynamo.utils.counters["stats"])
    assert graphs.get("unique_graphs", 0) > 0
    again = model.generate(ragged_prompts((2, 3), seed=5), 12, temperature=0, compile=True)
    assert [len(r) for r in again] == [14, 15]
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # a new cache, same shapes: no recompilation


@pytest.fixture
def saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MetaGPT(256, 32, 1, 4, 0.0, 32)  # the byte vocabulary of the CLI
    state = {"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}
    return checkpoint.save(state, tmp_path / "ckpt.pt")


class Recorder(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_cli_streams_the_text_as_it_comes(saved_checkpoint, monkeypatch, capsys):
    base = ["generate", "--checkpoint", str(saved_checkpoint), "--prompt", "héllo", "--max-new-tokens", "10"]
    assert main([*base, "--no-stream"]) == 0
    whole = capsys.readouterr().out
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    assert main(base) == 0
    assert out.getvalue() == whole and whole.startswith("héllo")
    assert out.flushes >= 10  # one flush per token (and the prompt)
    monkeypatch.undo()
    assert main([*base, "--no-cache", "--no-stream"]) == 0
    assert capsys.readouterr().out == whole  # same seed, same draws
    assert main([*base, "--stop", "ab"]) == 2
    assert "--stop must be one byte" in capsys.readouterr().err


@pytest.mark.parametrize("batch,padding", [(1, False), (2, False), (2, True)])
def test_hf_decode_steps_go_through_the_decode_op(batch, padding, monkeypatch):
    transformers = pytest.importorskip("transformers")
    hf = pytest.importorskip("metagpt_fast.integrations.hf")
    hf.register()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    models = {}
    for impl in ("metagpt_fast", "eager"):
        torch.manual_seed(0)
        # from_config records the implementation in the config: one config per model
        models[impl] = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        models[impl].eval()
    calls = []
    decode = hf.flash_attn_with_kvcache

    def counting(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return decode(q, *args, **kwargs)

    monkeypatch.setattr(hf, "flash_attn_with_kvcache", counting)
    ids = torch.randint(1, VOCAB, (batch, 5))
    mask = torch.ones_like(ids)
    if padding:
        mask[1, :2] = 0  # left padding: the decode steps carry a mask, which the decode op does not take
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = models["metagpt_fast"].generate(ids, **kwargs)
    assert torch.equal(got, models["eager"].generate(ids, **kwargs))
    if padding:
        assert calls == []
    else:
        assert calls == [(batch, 1, 4, 8)] * (5 * 2)  # 5 decode steps (the 6th token needs none) x 2 layers
    # With gradients (training), a single query keeps to the differentiable attention.
    calls.clear()
    q = torch.randn(1, 4, 1, 8, requires_grad=True)
    kv = torch.randn(1, 2, 7, 8)
    out, _ = hf.attention_forward(torch.nn.Module(), q, kv, kv, None)
    out.sum().backward()
    assert calls == [] and q.grad is not None

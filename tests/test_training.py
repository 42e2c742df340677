"""Training: the loss falls, resume is bit-exact, checkpoints are atomic and verified."""

import pytest
import torch

from metagpt_fast import checkpoint
from metagpt_fast.data import Splits, batch, decode, encode, read_corpus, stdlib_sources
from metagpt_fast.model import MetaGPTConfig
from metagpt_fast.training import TrainConfig, load_model, train

MODEL = MetaGPTConfig(vocab_size=256, embed_size=32, num_layers=2, num_heads=2, dropout=0.1, max_seq_length=32)


@pytest.fixture(scope="module")
def splits():
    return Splits.from_bytes(read_corpus(max_bytes=200_000))


def test_default_corpus_is_the_standard_library():
    files = stdlib_sources()
    assert any(f.name == "functools.py" for f in files)
    assert all("site-packages" not in f.parts for f in files)
    corpus = read_corpus(max_bytes=10_000)
    assert len(corpus) == 10_000 and decode(encode(corpus[:100])) == corpus[:100].decode("utf-8", "replace")


def test_corpus_from_a_folder(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 10)
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 50)
    assert read_corpus(tmp_path).startswith(b"hello world")
    with pytest.raises(FileNotFoundError, match="--data"):
        read_corpus(tmp_path / "missing")


def test_batches_are_next_byte_targets():
    tokens = torch.arange(100)
    x, y = batch(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert torch.equal(y, x + 1)


def test_loss_falls(splits):
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=5, eval_batches=2)
    losses = []
    result = train(MODEL, cfg, splits, on_step=lambda step, loss, tps: losses.append(loss))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert result.val_loss < 4.5  # uniform over bytes is ln(256) = 5.55


def test_resume_is_bit_exact(splits, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, save_every=3, eval_batches=1)
    straight = train(MODEL, cfg, splits, out=tmp_path / "a")
    # Interrupted after step 3 (the checkpoint of a 3-step run), then resumed to step 6.
    train(MODEL, TrainConfig(**{**cfg.__dict__, "steps": 3}), splits, out=tmp_path / "b")
    resumed = train(MODEL, cfg, splits, out=tmp_path / "b", resume=tmp_path / "b" / "ckpt.pt")
    assert resumed.train_loss == straight.train_loss
    a = checkpoint.load(tmp_path / "a" / "ckpt.pt")
    b = checkpoint.load(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    model = load_model(tmp_path / "b" / "ckpt.pt")
    assert not model.training and model.config.embed_size == 32


def test_corrupt_or_truncated_checkpoint_is_rejected_and_previous_kept(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.load(path)
    path.write_bytes(good[:5])
    with pytest.raises(checkpoint.CheckpointError, match="not a metagpt_fast checkpoint"):
        checkpoint.load(path)
    flipped = bytearray(good)
    flipped[-20] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(path)

    # A save that fails half-way leaves the previous checkpoint untouched and no temporary file behind.
    path.write_bytes(good)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save({"step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]

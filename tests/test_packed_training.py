"""Packed training (``metagpt-fast train --pack``): documents packed into the rows of a batch are kept apart.

The loss of a packed batch equals the per-document losses (each document run alone, weighted by its number of
predicted tokens), with the same parameter gradients, for both positional encodings; attention goes through
``flash_attn_varlen_func`` with the documents' boundaries.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from metagpt_fast.cli import main
from metagpt_fast.data import Splits, packed_batch, read_documents
from metagpt_fast.model import MetaGPT
from metagpt_fast.nn import PackedSequences
from metagpt_fast.training import TrainConfig, evaluate

DOCS = [b"def f(x):\n    return x\n\n", b"a", b"import os\n\n", b"class A:\n    pass\n\n\n\n", b"xy\n\n"]


def test_packed_batch_keeps_documents_apart():
    splits = Splits.from_documents(DOCS * 4, val_fraction=0.1)
    starts = splits.train_starts
    x, y, packed = packed_batch(splits.train, starts, 3, 20, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == packed.position_ids.shape == (3, 20)
    cu = packed.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 60 and (cu.diff() > 0).all()
    assert all(int(r) * 20 in cu.tolist() for r in range(3))  # every row starts a document
    assert packed.max_seqlen == int(cu.diff().max())
    flat_pos, flat_y = packed.position_ids.flatten(), y.flatten()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        assert flat_pos[a:b].tolist() == list(range(b - a))  # positions restart at each document
    # A target is ignored exactly where the next token starts a document of the corpus.
    assert (flat_y == -1).any()
    assert (flat_y[flat_y != -1] >= 0).all()


def test_from_documents_keeps_the_starts():
    splits = Splits.from_documents(DOCS, val_fraction=0.3)
    corpus = b"".join(DOCS)
    starts = [0]
    for d in DOCS[:-1]:
        starts.append(starts[-1] + len(d))
    n = len(splits.train)
    assert splits.train_starts.tolist() == [s for s in starts if s < n]
    assert splits.val_starts[0] == 0 and all(s + n in starts for s in splits.val_starts[1:].tolist())
    assert bytes(torch.cat((splits.train, splits.val)).tolist()) == corpus


def _doc_losses(model, x, y, packed):
    """The packed batch's loss computed document by document (each alone, positions from 0)."""
    total, count = 0.0, 0
    flat_x, flat_y = x.flatten(), y.flatten()
    cu = packed.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        logits, _ = model(flat_x[a:b][None])
        targets = flat_y[a:b]
        total = total + F.cross_entropy(logits[0], targets, ignore_index=-1, reduction="sum")
        count += int((targets != -1).sum())
    return total / count


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_packed_loss_equals_the_per_document_losses(positional):
    torch.manual_seed(0)
    model = MetaGPT(256, 32, 2, 4, 0.0, 24, positional=positional)
    splits = Splits.from_documents(DOCS * 3, val_fraction=0.1)
    x, y, packed = packed_batch(splits.train, splits.train_starts, 2, 24, torch.Generator().manual_seed(3))
    assert packed.cu_seqlens.numel() > 4  # several documents per row

    _, loss = model(x, y, return_logits=False, packed=packed)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = _doc_losses(model, x, y, packed)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4, msg=name)

    # Without the boundaries, attention crosses them: the loss differs.
    _, crossing = model(x, y, return_logits=False)
    assert abs(crossing.item() - loss.item()) > 1e-4


def test_packed_rejects_bad_positions():
    model = MetaGPT(256, 16, 1, 2, 0.0, 8)
    x = torch.zeros(1, 8, dtype=torch.long)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, packed=PackedSequences(cu, 8, torch.zeros(1, 7, dtype=torch.long)))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(
            x, packed=PackedSequences(torch.tensor([0, 5], dtype=torch.int32), 5, torch.zeros(1, 8, dtype=torch.long))
        )
    packed = PackedSequences(cu, 8, torch.arange(8)[None])
    model(x, packed=packed)
    with pytest.raises(TypeError, match="packed"):
        model(x, packed=dataclasses.asdict(packed))


def test_packed_evaluation_equals_the_per_document_losses():
    """evaluate(..., starts): the held-out batches packed as in training; each batch's loss is its documents'."""
    torch.manual_seed(0)
    model = MetaGPT(256, 32, 2, 4, 0.0, 24, positional="rotary")
    splits = Splits.from_documents(DOCS * 6, val_fraction=0.4)
    cfg = TrainConfig(batch_size=2, eval_batches=3, seed=5)
    got = evaluate(model, splits.val, cfg, 24, splits.val_starts)
    generator = torch.Generator().manual_seed(cfg.seed + 1)  # evaluate's batches, drawn again
    losses = []
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y, packed = packed_batch(splits.val, splits.val_starts, cfg.batch_size, 24, generator)
            assert packed.cu_seqlens.numel() > 3  # documents inside the windows
            losses.append(_doc_losses(model, x, y, packed).item())
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-5, abs=1e-6)
    assert abs(evaluate(model, splits.val, cfg, 24) - got) > 1e-4  # unpacked windows cross the boundaries


def test_train_pack_cli(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, doc in enumerate(DOCS * 4):
        (data / f"{i:02d}.txt").write_bytes(doc)
    assert len(read_documents(data)) == len(DOCS) * 4
    args = ["train", "--pack", "--data", str(data), "--steps", "2", "--batch-size", "2", "--embed-size", "16",
            "--layers", "1", "--heads", "2", "--seq-len", "16", "--out", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "held-out loss" in capsys.readouterr().out

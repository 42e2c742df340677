"""DistributedDataParallel on CPU (gloo, 2 processes): each rank trains on half of a global batch; the averaged loss
and the all-reduced gradients equal one process's loss and gradients on the whole batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import metagpt_fast
from metagpt_fast.testing import assert_parity

AVAILABLE = [name for name, reason in metagpt_fast.available_backends().items() if reason is None]
WORLD, GLOBAL_BATCH, T = 2, 4, 9
# slow: spawns two ranks per configuration.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]


def backends():
    """Backends that run CPU tensors here. Interpreted Triton is included: the spawned ranks inherit
    TRITON_INTERPRET from the test process."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return [name for name in AVAILABLE if name in ("reference", "cpu") or (name == "triton" and interpreted)]


def make_model(backend, positional):
    torch.manual_seed(0)
    return metagpt_fast.MetaGPT(64, 32, 1, 4, 0.0, 32, positional=positional, backend=backend)


def make_batch():
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (GLOBAL_BATCH, T), generator=generator)
    targets = torch.randint(0, 64, (GLOBAL_BATCH, T), generator=generator)
    return idx, targets


CONFIGS = [(backend, positional) for backend in backends() for positional in ("sinusoidal", "rotary")]


def _worker(rank, port, configs, out_dir):
    """One rank: every (backend, positional) configuration in one process group (one spawn keeps the test fast)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for backend, positional in configs:
            model = torch.nn.parallel.DistributedDataParallel(make_model(backend, positional))
            idx, targets = make_batch()
            shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
            _, loss = model(idx[shard], targets[shard])
            loss.backward()  # DDP all-reduces (averages) the gradients
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= WORLD
            grads = {n: p.grad for n, p in model.module.named_parameters()}
            results[backend, positional] = {"loss": mean_loss, "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), CONFIGS, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("backend, positional", CONFIGS)
def test_ddp_matches_single_process(backend, positional, ddp_results):
    model = make_model(backend, positional)
    idx, targets = make_batch()
    _, loss = model(idx, targets)
    loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    for rank, results in enumerate(ddp_results):
        got = results[backend, positional]
        assert_parity(got["loss"], got["loss"], loss.detach(), name=f"rank {rank} loss")
        assert got["grads"].keys() == expected.keys()
        for name, grad in got["grads"].items():
            assert_parity(grad, grad, expected[name], name=f"rank {rank} {name}")

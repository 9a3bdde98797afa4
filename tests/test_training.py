"""nanochat/training.py: one optimizer step (`train_step`) -- what it reads on the host and in which order
it talks to the other ranks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.common import RuntimeContext
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer
from nanochat.train_loop import SyntheticLoader
from nanochat.training import NonFiniteLoss, train_step
from nanochat.training import TestHooks as Hooks
from tests.helpers import free_port

VOCAB, T, B = 128, 16, 2


def _setup(rank=0, world=1, ddp=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                          value_embeds=True, resid_scalars=True))
    model.init_weights()
    opt = build_optimizer(model, matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.01, scalar_lr=0.01,
                          weight_decay=0.1, orth_dtype=torch.float32, shard_min_numel=0)
    ctx = RuntimeContext(device_type="cpu", device=torch.device("cpu"), dtype=torch.float32, ddp=ddp, rank=rank,
                         world_size=world, backend="gloo" if ddp else None)
    loader = SyntheticLoader(VOCAB, B, T, 2, "cpu", rank, world)
    return model, opt, ctx, loader


def test_a_whole_step_reads_one_value_pair_on_the_host(monkeypatch):
    """On a GPU every host read of a tensor (.item(), .tolist(), float(t), if t: ...) and every tensor made
    from a Python number (torch.tensor(x, device=cuda), a pageable copy) waits for the device. The CPU
    analogue over the whole train_step -- forward, backward, flags, update: all of them fail except the one
    read the step needs (the reduced loss and stop flag, a single .tolist() of two values)."""
    model, opt, ctx, loader = _setup()
    train_step(model, opt, loader, 2, ctx)  # the optimizer state exists
    reads = []

    def host_read(*args, **kwargs):
        raise AssertionError("train_step read a tensor on the host / made one from a Python number")

    real_tolist = torch.Tensor.tolist

    def one_read(t):
        reads.append(tuple(t.shape))
        return real_tolist(t)

    for name in ("item", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch.Tensor, "tolist", one_read)
    monkeypatch.setattr(torch, "tensor", host_read)
    result = train_step(model, opt, loader, 2, ctx)
    monkeypatch.undo()
    assert reads == [(2,)]
    assert result.loss > 0 and result.stop_requested is False


def test_a_non_finite_loss_raises_before_the_update():
    model, opt, ctx, loader = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        train_step(model, opt, loader, 2, ctx, step=3, hooks=Hooks(nan_step=3))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _order_worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from nanochat import optim

        log = []
        real_all_reduce, real_rs = dist.all_reduce, optim._reduce_scatter

        def all_reduce(t, *a, **k):
            log.append(("all_reduce", tuple(t.shape)))
            return real_all_reduce(t, *a, **k)

        def reduce_scatter(out_, full):
            log.append(("reduce_scatter", tuple(full.shape)))
            return real_rs(out_, full)

        dist.all_reduce, optim._reduce_scatter = all_reduce, reduce_scatter
        model, opt, ctx, loader = _setup(rank, world, ddp=True)
        losses = []
        for step in range(3):
            log.clear()
            losses.append(train_step(model, opt, loader, 2, ctx, step=step).loss)
        torch.save({"log": list(log), "losses": losses}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_flags_all_reduce_is_issued_before_the_gradient_reductions(tmp_path):
    """Under DDP the step's flags are reduced before the last backward starts the gradient reductions, so the
    host's one read is not queued behind the gradient traffic (2 gloo ranks); the losses are the 1-rank ones."""
    mp.spawn(_order_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    logs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in logs:
        kinds = [k for k, _ in r["log"]]
        assert kinds[0] == "all_reduce" and r["log"][0][1] == (2,), r["log"]
        assert "reduce_scatter" in kinds[1:], r["log"]
    assert logs[0]["losses"] == logs[1]["losses"]
    model, opt, ctx, _ = _setup()
    single = SyntheticLoader(VOCAB, B, T, 4, "cpu", 0, 1)  # 1 rank x 4 micro-batches == 2 ranks x 2
    ref = [train_step(model, opt, single, 4, ctx, step=s).loss for s in range(3)]
    assert logs[0]["losses"] == pytest.approx(ref, rel=1e-5)

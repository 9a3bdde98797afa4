"""nanochat/training.py: the frame every phase runs in (phase_run), what is due when, one optimizer step
(train_step) for every phase including RL's policy gradient -- what it reads on the host and in which order it
talks to the other ranks -- and the fine-tuning plan in nanochat/sizing.py."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat import sizing
from nanochat.chat_rl import PolicyGradientLoss, group_advantages
from nanochat.common import RuntimeContext, init_runtime
from nanochat.config import ConfigError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer
from nanochat.train_loop import SyntheticLoader
from nanochat.training import EXIT_OOM, NonFiniteLoss, due, exit_oom, phase_run, train_step
from nanochat.training import TestHooks as Hooks
from tests.helpers import free_port


@pytest.fixture
def ctx():
    return init_runtime("cpu", "float32", seed=0)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    return model


def save_step(folder, step):
    model = tiny_model()
    ckpt.save_checkpoint(folder, step, model.state_dict(), None, {"model_config": model.config.to_dict()})


def test_phase_run_takes_the_folder_resolves_resume_and_cleans_up(base_dir, ctx):
    with phase_run("base", "d2", None, ctx, "test") as run:
        assert run.out_dir == rd.run_dir("base", "d2") and run.resume is None and run.source is None
        assert (run.out_dir / "run.lock").exists()
        with pytest.raises(ConfigError, match="in use by process"):  # one writer per folder
            with phase_run("base", "d2", None, ctx, "second"):
                pass
        save_step(run.out_dir, 3)
    with phase_run("base", "d2", "auto", ctx, "test") as run:  # --resume auto over a checkpoint: latest
        assert run.resume == "latest"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        with phase_run("base", "d2", None, ctx, "test"):
            pass
    # a failing run that wrote nothing of its own leaves no folder; --resume of nothing is refused up front
    with pytest.raises(RuntimeError, match="boom"):
        with phase_run("base", "fresh", None, ctx, "test") as run:
            run.write_record({}, {}, {}, None)
            raise RuntimeError("boom")
    assert not rd.run_dir("base", "fresh").exists()
    with pytest.raises(ConfigError, match="--resume latest: no complete checkpoint"):
        with phase_run("base", "fresh", "latest", ctx, "test"):
            pass
    assert not rd.run_dir("base", "fresh").exists()


def test_phase_run_of_a_fine_tuning_phase_names_its_source(base_dir, ctx):
    save_step(rd.run_dir("base", "d7"), 5)
    with phase_run("sft", None, "auto", ctx, "test", source_phase="base") as run:
        assert run.source == {"phase": "base", "tag": "d7", "step": None} and run.out_dir.name == "d7"
        run.source["step"] = 5
        run.write_record({"mix": "x"}, {"n_layer": 1}, {"matrix_lr": 0.1}, None, extra=1)
        assert run.checkpoint_meta(val_loss=1.5) == {"phase": "sft", "args": {"mix": "x"}, "model_config": {"n_layer": 1},
                                                     "sizing": {"matrix_lr": 0.1}, "val_loss": 1.5,
                                                     "source": {"phase": "base", "tag": "d7", "step": 5}}
    record = rd.read_run_json(rd.run_dir("sft", "d7"))
    assert record["env"]["extra"] == 1 and record["env"]["resumed_from"] is None and record["source"]["step"] == 5


def test_due_every_n_steps_last_only_or_never():
    assert [s for s in range(1, 11) if due(4, s, s == 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(-1, s, s == 10)] == [10]
    assert [s for s in range(1, 11) if due(0, s, s == 10)] == []


def test_exit_oom_is_one_line_naming_rank_flag_and_remedy(ctx, capsys):
    from nanochat.autobatch import oom_message

    assert exit_oom(ctx, oom_message(8, 256, where="step 3", remedy="lower --device-batch-size")) == EXIT_OOM
    err = capsys.readouterr().err
    assert err == ("[rank 0] CUDA out of memory at step 3 with --device-batch-size=8 (x 256 tokens): "
                   "lower --device-batch-size\n")


def test_pretraining_lrs_come_from_the_checkpoint_lineage():
    base = {k: 2 * v for k, v in sizing.BASE_LRS.items()}
    assert sizing.pretraining_lrs({"sizing": base}) == base  # a base checkpoint's plan
    sft = sizing.FinetunePlan(base, 0.8, 0.0, 1, 4, 64, 2, None, 1.0, 100).to_dict()
    assert sft["matrix_lr"] == pytest.approx(0.8 * base["matrix_lr"]) and sft["tokens_per_step"] == 4 * 64 * 2
    assert sizing.pretraining_lrs({"sizing": sft}) == base  # an SFT checkpoint: its base_lrs, not its own LRs
    assert sizing.pretraining_lrs({}, None, {"sizing": base}) == base  # older metas: the run record
    assert sizing.pretraining_lrs({}) == sizing.BASE_LRS


def test_fine_tuning_schedules():
    """SFT: flat, then linear to final_lr_frac over the last warmdown_ratio of progress; momentum 0.85 -> 0.95
    over 300 steps. RL: linear to 0 (REFERENCE section 11)."""
    for p in (0.0, 0.3, 0.5, 0.6, 0.9, 1.0):
        expect = 1.0 if p < 0.5 else (1 - p) / 0.5 + (1 - (1 - p) / 0.5) * 0.1
        assert sizing.sft_lr_multiplier(p, 0.5, 0.1) == pytest.approx(expect)
    assert [sizing.sft_muon_momentum(s) for s in (0, 150, 300, 900)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert [sizing.rl_lr_multiplier(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_policy_gradient_through_train_step_matches_the_loss_written_out(ctx):
    """RL's update runs through train_step: the gradient it applies equals that of -sum(logp * advantage) /
    (sampled tokens x problems per rank) over the step's chunks, computed directly (the pre-train_step code)."""
    torch.manual_seed(1)
    chunks = []
    for n in (3, 2):  # one problem, 5 replies in chunks of 3 and 2
        x = torch.randint(0, 64, (n, 10))
        y = torch.randint(0, 64, (n, 10))
        y[:, :4] = -1  # the prompt
        chunks.append((x, y))
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0]))
    valid = sum(int((y >= 0).sum()) for _, y in chunks)
    norm = valid * 1

    ref = tiny_model()
    ref_loss = 0.0
    offset = 0
    for x, y in chunks:
        a = adv[offset:offset + len(x)]
        offset += len(x)
        logp = -ref(x, y, loss_reduction="none")
        loss = -(logp * a[:, None]).sum() / norm
        loss.backward()
        ref_loss += float(loss.detach())

    model = tiny_model()
    opt = build_optimizer(model)
    grads = {}
    opt.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    offsets = [0, 3]
    batches = iter([(x, (y, adv[o:o + len(x)], norm)) for (x, y), o in zip(chunks, offsets)])
    result = train_step(PolicyGradientLoss(model, 2), opt, batches, 2, ctx)
    assert result.loss == pytest.approx(ref_loss, rel=1e-5)
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# train_step: host reads and the order of collectives

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

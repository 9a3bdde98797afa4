"""nanochat/training.py: the frame every phase runs in (phase_run), what is due when, one optimizer step
(train_step) for every phase including RL's policy gradient, and the fine-tuning plan in nanochat/sizing.py."""

import pytest
import torch

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat import sizing
from nanochat.chat_rl import PolicyGradientLoss, group_advantages
from nanochat.common import init_runtime
from nanochat.config import ConfigError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer
from nanochat.training import EXIT_OOM, due, exit_oom, phase_run, train_step


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

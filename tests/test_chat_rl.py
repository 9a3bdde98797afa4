"""RL: group advantages, a deterministic-reward toy task whose mean reward rises, exact resume,
num_samples not divisible by the device batch."""

import json
import shutil

import pytest
import torch

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat.chat_rl import ProblemCursor, RLConfig, group_advantages, run_rl
from nanochat.tasks import Task, TaskDataError
from tests.chat_helpers import make_base_checkpoint

VOWELS = set("aeiouAEIOU")


class Vowels(Task):
    """Reward: the fraction of the reply's letters that are vowels (deterministic, dense: a random model
    starts near the corpus rate, and a policy gradient can push it up by preferring vowel-rich tokens)."""
    name = "Vowels"

    def num_examples(self):
        return 32

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"Say something with vowels, number {i}."},
                             {"role": "assistant", "content": "aeiou"}]}

    def reward(self, conv, completion):
        letters = [c for c in completion if c.isalpha()]
        return sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0

    def evaluate(self, conv, completion):
        return self.reward(conv, completion) > 0.5


@pytest.fixture
def base(base_dir):
    try:
        make_base_checkpoint(base_dir, seq_len=128)
    except TaskDataError as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)
    return base_dir


def cfg(**kw):  # LRs x 5 (not the recipe's x 0.05): a random-init toy must move within 20 steps
    c = dict(source="base", examples_per_step=4, num_samples=6, device_batch_size=4, max_new_tokens=8,
             temperature=1.0, top_k=0, init_lr_frac=5.0, num_iterations=20, eval_every=0, device_type="cpu", quiet=True)
    c.update(kw)
    return RLConfig(**c)


def test_group_advantages_sum_to_zero():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    a = group_advantages(r)
    assert a.sum().abs() < 1e-6 and torch.allclose(a, r - 0.6)
    assert ProblemCursor(10).problems(3, 4, 1, 2) == [3, 5]  # step 3, 4 per step: problems 12..15 mod 10, rank 1 of 2


@pytest.mark.slow
def test_mean_reward_rises_on_a_deterministic_task(base):
    assert run_rl(cfg(), train_task=Vowels()) == 0
    records = rd.read_metrics(rd.run_dir("rl", "d2"))
    assert len(records) == 20
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards
    assert all(abs(r["advantage_sum"]) < 1e-4 for r in records)
    # num_samples 6 over device batches of 4: every step trained on all 6 replies of each of its 4 problems
    assert all(r["tokens_per_sample"] > 0 for r in records)
    meta = ckpt.load_meta(rd.run_dir("rl", "d2"), 20)
    assert meta["phase"] == "rl" and (rd.run_dir("rl", "d2") / "optim_000020_rank0.pt").exists()


@pytest.mark.slow
def test_resume_with_optimizer_state_reproduces_the_run(base):
    common = dict(num_iterations=6)
    assert run_rl(cfg(model_tag="full", save_every=3, **common), train_task=Vowels()) == 0
    full, part = rd.run_dir("rl", "full"), rd.run_dir("rl", "part")
    part.mkdir(parents=True)
    for f in full.iterdir():
        if "000003" in f.name:
            shutil.copy(f, part / f.name)
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rd.read_metrics(full) if r["step"] <= 3))
    assert run_rl(cfg(model_tag="part", resume_from_step="latest", **common), train_task=Vowels()) == 0
    a, b = rd.read_metrics(full), rd.read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [(r["reward"], r["loss"]) for r in a] == [(r["reward"], r["loss"]) for r in b]
    wa, _, _ = ckpt.load_checkpoint(full, 6)
    wb, _, _ = ckpt.load_checkpoint(part, 6)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_configs_are_one_line_errors(base, capsys):
    assert run_rl(cfg(examples_per_step=0), train_task=Vowels()) == 2
    assert "--examples-per-step must be >= 1" in capsys.readouterr().err
    assert run_rl(cfg(task="nope", eval_every=0)) == 2
    assert "unknown --task 'nope'" in capsys.readouterr().err

"""Chat evaluation: the ChatCORE formula (the reference's d20 row), pass@k, oracle and uniform models,
batched categorical decisions equal one-at-a-time, generative scoring against an unbatched loop, the CLI."""

import itertools
import json

import pytest
import torch

from nanochat.chat_eval import (BASELINES, categorical_predictions, chatcore, pass_at_k, run_categorical,
                                run_chat_eval, run_generative, to_markdown)
from nanochat.engine import Engine
from nanochat.tasks import MMLU, Task, TaskDataError
from tests.chat_helpers import chat_tokenizer, make_base_checkpoint, tiny_model


def test_chatcore_reproduces_the_reference_d20_row():
    row = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854}
    out = chatcore(row)
    assert out["chatcore"] == pytest.approx(0.0884, abs=5e-5) and out["missing"] == []
    by_hand = ((0.3876 - .25) / .75 + (0.2807 - .25) / .75 + (0.3151 - .25) / .75 + 0.0455 + 0.0854) / 5
    assert out["chatcore"] == pytest.approx(by_hand, rel=1e-12)
    part = chatcore({"ARC-Easy": 1.0, "GSM8K": 0.5, "EmbeddedChat": 0.9})
    assert part["chatcore"] == pytest.approx(0.75) and part["tasks"] == ["ARC-Easy", "GSM8K"]
    assert part["missing"] == ["ARC-Challenge", "MMLU", "HumanEval"]
    assert chatcore({})["chatcore"] is None and chatcore({t: b for t, b in BASELINES.items()})["chatcore"] == 0.0


def test_pass_at_k_is_the_exact_probability():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (8, 3, 8)]:
        draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


@pytest.fixture(scope="module")
def tok():
    try:
        return chat_tokenizer()
    except TaskDataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def mmlu(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("task_data")
    (d / "mmlu").mkdir()
    (d / "mmlu" / "test.jsonl").write_text((shared_data / "chat" / "mmlu_dev.jsonl").read_text())
    return d, MMLU("all", "test", task_data=d)


class ScoringModel(torch.nn.Module):
    """Logits from a rule on the prompt (the model interface chat_eval uses: config, get_device, forward with
    positions): the oracle puts the right letter first, the uniform model scores every token alike."""

    def __init__(self, tokenizer, answers: dict | None, vocab: int):
        super().__init__()
        self.tok, self.answers, self.vocab = tokenizer, answers, vocab
        self.config = type("C", (), {"sequence_len": 10**6})()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, positions):
        rows, cols = positions
        logits = torch.zeros(len(rows), self.vocab)
        if self.answers is not None:
            for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
                letter = self.answers[tuple(idx[r, :c + 1].tolist())]
                logits[i, self.tok.encode(letter)[0]] = 10.0
        return logits


def test_oracle_scores_one_and_uniform_logits_score_chance(tok, mmlu):
    _, task = mmlu
    answers = {tuple(tok.render_for_completion(c)): c["messages"][-1]["content"] for c in task}
    oracle = run_categorical(task, ScoringModel(tok, answers, tok.get_vocab_size()), tok, batch_size=16)
    assert oracle["accuracy"] == 1.0 and oracle["n"] == 272
    uniform = run_categorical(task, ScoringModel(tok, None, tok.get_vocab_size()), tok, batch_size=16)
    share_a = sum(c["messages"][-1]["content"] == "A" for c in task) / len(task)
    assert uniform["accuracy"] == pytest.approx(share_a)  # argmax of equal logits: the first letter
    assert abs(chatcore({"MMLU": uniform["accuracy"]})["chatcore"]) < 0.1
    assert chatcore({"MMLU": oracle["accuracy"]})["chatcore"] == 1.0


def test_batched_decisions_equal_one_at_a_time(tok, mmlu):
    _, task = mmlu
    model = tiny_model(tok.get_vocab_size(), seq_len=1024, n_embd=32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)  # a model with opinions that depend on the question
    convs = [task[i] for i in range(16)]
    batched = categorical_predictions(model, tok, convs)
    single = [categorical_predictions(model, tok, [c])[0] for c in convs]
    assert batched == single and len(set(batched)) > 1


class FirstCharTask(Task):
    """Generative toy: a reply is right when it is non-empty and its first character's code is even."""
    name = "FirstChar"

    def num_examples(self):
        return 6

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"Say something {i}"}, {"role": "assistant", "content": "x"}]}

    def evaluate(self, conv, completion):
        return bool(completion) and ord(completion[0]) % 2 == 0


def test_generative_pass_at_k_matches_an_unbatched_loop(tok):
    model = tiny_model(tok.get_vocab_size(), seq_len=64, n_embd=32).eval()
    task = FirstCharTask()
    out = run_generative(task, model, tok, num_samples=3, max_new_tokens=4, temperature=1.0, top_k=20, batch_size=2,
                         seed=3)
    engine = Engine(model, tok)
    p1 = p3 = 0.0
    for i in range(len(task)):
        prompt = tok.render_for_completion(task[i])
        replies = []
        for j in range(3):  # one reply at a time, each with its own seed
            seqs, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=4, temperature=1.0, top_k=20,
                                            seed=3 + 1000 * i + j)
            replies.append(tok.decode(seqs[0][len(prompt):]))
        assert len(replies) == 3
        c = sum(task.evaluate(task[i], r) for r in replies)
        p1, p3 = p1 + c / 3, p3 + (c > 0)
    assert out["n"] == 6 and out["pass@1"] == pytest.approx(p1 / 6) and out["pass@3"] == pytest.approx(p3 / 6)
    assert 0 < out["pass@1"] < out["pass@3"]


def test_missing_tasks_are_reported_not_zero(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "arc-easy").mkdir()
    (tmp_path / "arc-easy" / "test.jsonl").write_text(json.dumps(
        {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}) + "\n")
    model = tiny_model(tok.get_vocab_size(), seq_len=128).eval()
    out = run_chat_eval(model, tok, tasks=["ARC-Easy", "MMLU"], task_data=tmp_path, quiet=True)
    assert out["chatcore_tasks"] == ["ARC-Easy"] and "MMLU" in out["missing"]
    assert "no local table for mmlu/test" in out["missing"]["MMLU"]
    md = to_markdown(out)
    assert "| MMLU | - | not run |" in md and "ChatCORE" in md and "not run: ARC-Challenge, MMLU" in md


@pytest.mark.slow
def test_cli_writes_json_and_markdown(tok, base_dir, capsys):
    from scripts import chat_eval

    make_base_checkpoint(base_dir)
    assert chat_eval.main(["--source", "base", "-a", "EmbeddedChat", "-x", "10", "-m", "8", "--device-type", "cpu"]) == 0
    out = json.loads((base_dir / "base_checkpoints" / "d2" / "chat_eval_000000.json").read_text())
    r = out["tasks"]["EmbeddedChat"]
    assert r["n"] == 10 and 0.0 <= r["accuracy"] <= 1.0 and out["chatcore"] is None
    # 10 problems: 2 of each kind, the held-out multi-turn chats among them
    assert set(r["by_kind"]) == {"verse", "arithmetic", "letters", "identity", "multiturn"}
    assert r["accuracy"] == pytest.approx(sum(r["by_kind"].values()) / 5)
    assert len(out["samples"]["EmbeddedChat"]) == 2
    assert chat_eval.main(["-a", "Nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_report_chat_section_tables_phases_and_samples():
    from nanochat.report import chat_section

    base = {"tasks": {"ARC-Easy": {"accuracy": 0.25}, "EmbeddedChat": {"accuracy": 0.0}}, "chatcore": 0.0,
            "chatcore_tasks": ["ARC-Easy"], "samples": {}}
    sft = {"tasks": {"ARC-Easy": {"accuracy": 0.4}, "EmbeddedChat": {"accuracy": 0.3}}, "chatcore": 0.2,
           "chatcore_tasks": ["ARC-Easy"],
           "samples": {"EmbeddedChat": [{"prompt": "Who are you?", "reply": "I am nanochat.", "correct": True}]}}
    text = chat_section({"base": base, "sft": sft, "rl": None}, {"val_loss_start": 5.0, "val_loss": 2.5, "steps": 10})
    assert "| task | base | SFT |" in text and "| EmbeddedChat | 0.0000 | 0.3000 |" in text
    assert "| **ChatCORE** |" in text and "over the tasks that ran: ARC-Easy" in text
    assert "5.0000 before, 2.5000 after 10 steps" in text and "**user:** Who are you?" in text and "(right)" in text
    assert chat_section({}) == "## Chat\n\nNo chat evaluation yet.\n"

"""Task data: slicing, mixtures, multiple-choice rendering, local tables in hub order, GSM8K tool calls,
offline loaders that fail fast, and the embedded chat mix."""

import json
import os
import subprocess
import sys
import time

import pytest

from nanochat.tasks import (ARC, GSM8K, MMLU, EmbeddedChat, HumanEval, Task, TaskDataError, TaskMixture,
                            TaskSequence, build_mix, parse_mix)
from nanochat.tasks.hub_tasks import extract_program, gsm8k_answer, gsm8k_parts
from tests.helpers import free_port


class Numbers(Task):
    name = "Numbers"

    def __init__(self, n, tag="n", **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"{self.tag}{i}"}, {"role": "assistant", "content": "ok"}]}


def user_texts(task):
    return [c["messages"][0]["content"] for c in task]


def test_slicing_matches_python_ranges():
    t = Numbers(10, start=2, stop=9, step=2)
    assert user_texts(t) == [f"n{i}" for i in range(10)[2:9:2]]
    assert user_texts(Numbers(10)[3:7]) == ["n3", "n4", "n5", "n6"]
    assert user_texts(Numbers(10)[::3][1:]) == ["n3", "n6", "n9"]
    assert Numbers(10)[-1]["messages"][0]["content"] == "n9"
    with pytest.raises(IndexError):
        Numbers(3)[3]
    with pytest.raises(ValueError, match="step >= 1"):
        Numbers(3, step=0)


def test_mixture_is_a_seeded_permutation_and_oversamples_repeats():
    a, b = Numbers(5, "a"), Numbers(3, "b")
    mix = TaskMixture([a, b, b], seed=7)
    got = user_texts(mix)
    assert sorted(got) == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)] * 2)
    assert got == user_texts(TaskMixture([a, b, b], seed=7))  # fixed seed: same order
    assert got != user_texts(TaskMixture([a, b, b], seed=8))
    assert user_texts(TaskSequence([a, b])) == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)]
    with pytest.raises(ValueError, match="empty task"):
        TaskMixture([a, Numbers(0)])


def test_parse_mix_and_its_errors():
    assert parse_mix("smoltalk,mmlu-aux*3,gsm8k*4") == [("smoltalk", 1), ("mmlu-aux", 3), ("gsm8k", 4)]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_mix("nope")
    with pytest.raises(ValueError, match="k >= 1"):
        parse_mix("gsm8k*0")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mmlu_from_a_local_table_keeps_row_order_and_renders_letters(shared_data, tmp_path):
    rows = [json.loads(line) for line in (shared_data / "chat" / "mmlu_dev.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "mmlu" / "dev.jsonl", rows)
    task = MMLU("all", "dev", task_data=tmp_path)
    assert len(task) == len(rows) == 272
    for i in (0, 100, 271):
        conv = task[i]
        user = conv["messages"][0]["content"]
        assert rows[i]["question"] in user
        for letter, choice in zip("ABCD", rows[i]["choices"]):
            assert f"- {choice}={letter}\n" in user + "\n"  # no space before the letter
        assert conv["messages"][1]["content"] == "ABCD"[rows[i]["answer"]]
        assert conv["letters"] == list("ABCD")
        assert task.evaluate(conv, "ABCD"[rows[i]["answer"]])


def test_mmlu_auxiliary_train_rows_nested_under_train(tmp_path):
    write_jsonl(tmp_path / "mmlu-aux" / "train.jsonl",
                [{"train": {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": ""}}])
    assert MMLU("auxiliary_train", "train", task_data=tmp_path)[0]["messages"][1]["content"] == "B"


def test_arc_from_the_bundle_rows_in_hub_columns(shared_data, tmp_path):
    src = shared_data / "eval_bundle" / "eval_data" / "world_knowledge" / "arc_easy.jsonl"
    bundle = [json.loads(line) for line in src.read_text().splitlines()[:50]]
    hub_rows = [{"id": str(i), "question": r["query"].removeprefix("Question: ").removesuffix("\nAnswer:"),
                 "choices": {"text": r["choices"], "label": list("ABCD"[:len(r["choices"])])},
                 "answerKey": "ABCD"[r["gold"]]} for i, r in enumerate(bundle)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "arc-easy").mkdir()
    pq.write_table(pa.Table.from_pylist(hub_rows), tmp_path / "arc-easy" / "test.parquet")
    task = ARC("ARC-Easy", "test", task_data=tmp_path)
    assert len(task) == 50
    for i, r in enumerate(bundle):
        assert task[i]["messages"][1]["content"] == "ABCD"[r["gold"]]
        assert hub_rows[i]["question"] in task[i]["messages"][0]["content"]


def test_numeric_arc_labels_map_to_letters(tmp_path):
    write_jsonl(tmp_path / "arc-challenge" / "test.jsonl",
                [{"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"}])
    conv = ARC("ARC-Challenge", "test", task_data=tmp_path)[0]
    assert conv["messages"][1]["content"] == "C" and conv["letters"] == ["A", "B", "C"]


GSM_ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                       "in May. How many clips did Natalia sell altogether in April and May?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                     "altogether in April and May.\n#### 72"}


def test_gsm8k_annotations_become_tool_calls_and_the_answer_is_scored(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [GSM_ROW, dict(GSM_ROW, answer="#### 1,234")])
    task = GSM8K("main", "test", task_data=tmp_path)
    parts = task[0]["messages"][1]["content"]
    assert parts == [{"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
                     {"type": "python_output", "text": "24"},
                     {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
                     {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
                     {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert "".join(p["text"] for p in gsm8k_parts(GSM_ROW["answer"]) if p["type"] == "text").endswith("#### 72")
    assert task.evaluate(task[0], "so 24 + 48 = 72\n#### 72")
    assert not task.evaluate(task[0], "#### 71")
    assert not task.evaluate(task[0], "72")  # no final answer line
    assert task.evaluate(task[1], "#### 1234") and gsm8k_answer("#### -3.5") == "-3.5"
    assert task.reward(task[0], "#### 72") == 1.0 and task.reward(task[0], "") == 0.0


def test_local_table_problems_are_one_line_errors(tmp_path):
    with pytest.raises(TaskDataError, match=r"no local table for gsm8k/test .*openai/gsm8k"):
        GSM8K("main", "test", task_data=tmp_path)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [])
    (tmp_path / "gsm8k" / "test.jsonl").write_text("")
    with pytest.raises(TaskDataError, match="holds no rows"):
        GSM8K("main", "test", task_data=tmp_path)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q"}])
    with pytest.raises(TaskDataError, match=r"lacks column\(s\) \['answer'\]"):
        GSM8K("main", "test", task_data=tmp_path)[0]
    with pytest.raises(TaskDataError, match="no split 'dev'"):
        GSM8K("main", "dev", task_data=tmp_path)


OFFLINE_PROBE = """
import sys, time
from nanochat.tasks import {cls}, TaskDataError
t0 = time.time()
try:
    {cls}({args})
except TaskDataError as e:
    print(f"{{time.time() - t0:.2f}} {{e}}")
    sys.exit(0)
sys.exit("loaded without a network?")
"""


@pytest.mark.parametrize("cls,args,offline_flag", [
    ("GSM8K", "'main', 'test'", False), ("MMLU", "'all', 'test'", False), ("SmolTalk", "'train'", False),
    ("HumanEval", "'test'", False), ("ARC", "'ARC-Challenge', 'test'", False),
    ("GSM8K", "'main', 'test'", True), ("MMLU", "'auxiliary_train', 'train'", True)])  # HF_HUB_OFFLINE, empty cache
def test_hub_loaders_fail_fast_offline_naming_the_override(cls, args, offline_flag, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NANOCHAT_TASK_DATA"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf"))
    if offline_flag:
        env["HF_HUB_OFFLINE"] = "1"
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", OFFLINE_PROBE.format(cls=cls, args=args)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr[-2000:]
    elapsed = time.time() - t0
    line = out.stdout.strip()
    assert "\n" not in line and "--task-data DIR" in line and "NANOCHAT_TASK_DATA" in line, line
    assert float(line.split()[0]) < 5.0 and elapsed < 20, line  # the load itself, then the interpreter start


def test_humaneval_program_assembly():
    conv = {"messages": [{"role": "user", "content": "from typing import List\n\ndef f(x):\n"},
                         {"role": "assistant", "content": ""}], "test": "def check(c):\n    assert c(1) == 2\n",
            "entry_point": "f"}
    prog = HumanEval.program(None, conv, "Here:\n```python\ndef f(x):\n    return x + 1\n```\nDone.")
    assert prog.startswith("from typing import List") and "return x + 1" in prog and "Done." not in prog
    assert prog.rstrip().endswith("check(f)")
    assert extract_program("def g():\n    pass\n") == "def g():\n    pass\n"


@pytest.fixture(scope="module")
def embedded():
    try:
        return EmbeddedChat("train", size=400), EmbeddedChat("val", size=200)
    except TaskDataError as e:
        pytest.skip(str(e))


def test_embedded_mix_is_deterministic_disjoint_and_self_consistent(embedded):
    train, val = embedded
    assert [c["messages"] for c in train[:20]] == [c["messages"] for c in EmbeddedChat("train", size=20)]
    train_q = {c["messages"][0]["content"] for c in train}
    val_q = {c["messages"][0]["content"] for c in val}
    assert not train_q & val_q
    assert {c["key"] for c in train if c["kind"] == "verse"}.isdisjoint({c["key"] for c in val if c["kind"] == "verse"})
    assert {c["kind"] for c in val} == {"verse", "arithmetic", "letters", "identity", "multiturn"}
    for conv in list(train[:120]) + list(val[:80]):
        content = conv["messages"][-1]["content"]
        reply = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        assert train.evaluate(conv, reply), conv
        assert not train.evaluate(conv, "I do not know.")
        if conv["kind"] in ("arithmetic", "letters"):  # the engine's calculator computes the expected answer
            from nanochat.tools import calculate

            call = [p["text"] for p in content if p["type"] == "python"][0]
            output = [p["text"] for p in content if p["type"] == "python_output"][0]
            assert calculate(call) == output == conv["expected"], call


def test_embedded_mix_holds_multi_turn_conversations_scored_on_the_last_reply(embedded):
    from nanochat.tasks.embedded import MULTITURN_MAX_CHARS, is_val

    train, val = embedded
    for split, want_val in ((train, False), (val, True)):
        multi = [c for c in split if c["kind"] == "multiturn"]
        assert len(multi) == len(split) // 5  # one kind in five
        assert {c["turns"] for c in multi} == {2, 3}
        assert sum(c["final_kind"] == "verse" for c in multi) > len(multi) / 3  # the case a single-turn mix broke
        for c in multi:
            roles = [m["role"] for m in c["messages"]]
            assert roles == ["user", "assistant"] * c["turns"]
            assert sum(len(m["content"]) if isinstance(m["content"], str) else sum(len(p["text"]) for p in m["content"])
                       for m in c["messages"]) <= MULTITURN_MAX_CHARS + 20  # + a follow-up prefix
            assert is_val(c["key"]) == want_val
            last = c["messages"][-1]["content"]
            reply = last if isinstance(last, str) else "".join(p["text"] for p in last if p["type"] == "text")
            assert split.evaluate(c, reply)
            # the earlier replies answer other questions: replying with one of them scores wrong
            first = c["messages"][1]["content"]
            earlier = first if isinstance(first, str) else "".join(p["text"] for p in first if p["type"] == "text")
            if earlier != reply:
                assert not split.evaluate(c, earlier) or c["final_kind"] == "identity" or c["expected"] in earlier
    # every question of a held-out multi-turn chat is held out: none of them appears in the train split
    train_questions = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
    val_last = {c["messages"][-2]["content"] for c in val if c["kind"] == "multiturn" and c["final_kind"] == "verse"}
    assert val_last and not val_last & train_questions


def test_embedded_mix_renders_with_the_tokenizer_masks(embedded):
    from tests.chat_helpers import chat_tokenizer

    tok = chat_tokenizer()
    conv = embedded[0][1]  # arithmetic: the tool output is not trained on
    ids, mask = tok.render_conversation(conv)
    out_start, out_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    i, j = ids.index(out_start), ids.index(out_end)
    assert mask[i:j + 1] == [0] * (j + 1 - i) and mask[ids.index(tok.encode_special("<|python_start|>"))] == 1
    assert build_mix("embedded", "val").name == "EmbeddedChat"

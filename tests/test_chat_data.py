"""SFT packing: masks -> targets, best-fit rows, crop/skip counting at short rows, exact resume, rank split."""

import json
from collections import Counter

import pytest
import torch

from nanochat.chat_data import ChatPackingLoader
from nanochat.tasks import EmbeddedChat, Task, TaskDataError
from tests.chat_helpers import chat_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    try:
        return chat_tokenizer()
    except TaskDataError as e:
        pytest.skip(str(e))


class Long(Task):
    """Multi-turn conversations of very different lengths (many far longer than a 128-token row),
    some starting with a user message longer than a row (nothing trainable survives a crop)."""
    name = "Long"

    def num_examples(self):
        return 60

    def get_example(self, i):
        turns = 1 + (i * 7) % 9
        msgs = []
        for t in range(turns):
            user = "What does the word mean? " * (40 if i % 10 == 3 else 1 + t)
            reply = f"It means {i} and {t}. " * (1 + i % 5)
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return {"messages": msgs}


def split_rows(inputs, targets, tok):
    """The conversations in packed rows, each without its last token (a conversation that ends a full row
    has lost it to the input/target shift). Each starts with <|bos|><|user_start|>; padding is BOS with
    no target."""
    bos, user_start = tok.get_bos_token_id(), tok.encode_special("<|user_start|>")
    convs = []
    for row, tgt in zip(inputs.tolist(), targets.tolist()):
        starts = [j for j in range(len(row) - 1) if row[j] == bos and row[j + 1] == user_start]
        assert starts and starts[0] == 0, "every row starts with a conversation"
        ends = starts[1:] + [len(row)]
        for s, e in zip(starts, ends):
            seg = row[s:e]
            padded = False
            while seg and seg[-1] == bos and all(t == -1 for t in tgt[s + len(seg) - 1:e]):
                seg, padded = seg[:-1], True  # trailing padding
            at_row_end = e == len(row) and not padded
            convs.append(tuple(seg if at_row_end else seg[:-1]))
    return convs


def test_targets_are_next_tokens_under_the_assistant_mask(tok):
    conv = EmbeddedChat("train", size=4)[1]
    ids, mask = tok.render_conversation(conv)
    loader = ChatPackingLoader(tok, EmbeddedChat("train", size=4)[1:2], batch_size=1, seq_len=len(ids) - 1, loop=False)
    x, y = next(loader)
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    with pytest.raises(StopIteration):
        next(loader)


@pytest.mark.parametrize("overflow", ["crop", "skip"])
def test_short_rows_finish_the_epoch_with_every_conversation_counted(tok, overflow):
    task = Long()
    rendered = [tok.render_conversation(c, max_tokens=10**9) for c in task]
    T = 128
    assert max(len(r[0]) for r in rendered) > 4 * T
    loader = ChatPackingLoader(tok, task, batch_size=4, seq_len=T, loop=False, overflow=overflow, buffer_size=8)
    model = tiny_model(tok.get_vocab_size(), seq_len=T)
    batches = list(loader)
    st = loader.stats()
    assert st["conversations"] == len(task) and st["used"] + st["cropped"] + st["skipped"] == len(task)
    fits = sum(len(ids) <= T + 1 for ids, _ in rendered)
    assert st["used"] == fits
    if overflow == "skip":
        assert st["cropped"] == 0 and st["skipped"] == len(task) - fits
    else:
        assert st["cropped"] > 0 and st["skipped"] == sum(1 for i in range(len(task)) if i % 10 == 3)
    packed = Counter()
    for x, y in batches:
        assert x.shape[1] == T and (y != -1).any(dim=1).all(), "every row trains at least one token"
        with torch.no_grad():
            assert torch.isfinite(model(x, y))
        packed.update(split_rows(x, y, tok))
    expected = Counter()
    for ids, mask in rendered:
        if len(ids) <= T + 1:
            expected[tuple(ids)] += 1
        elif overflow == "crop" and any(mask[1:T + 1]):
            expected[tuple(ids[:T + 1])] += 1
    assert len(batches) == -(-st["rows"] // 4)  # only the last batch may have fewer rows
    assert packed == Counter({k[:-1]: v for k, v in expected.items()})
    assert st["rows"] == sum(x.shape[0] for x, _ in batches)
    assert st["target_tokens"] == sum(int((y != -1).sum()) for _, y in batches)


def test_best_fit_fills_rows_better_than_first_come(tok):
    task = EmbeddedChat("train", size=200)
    lengths = [len(tok.render_conversation(c)[0]) for c in task]
    T = 256
    loader = ChatPackingLoader(tok, task, batch_size=8, seq_len=T, loop=False, buffer_size=64)
    list(loader)
    rows_best = loader.stats()["rows"]
    rows_fifo, room = 1, T + 1  # greedy in arrival order: a new row whenever the next one does not fit
    for n in lengths:
        if n > room:
            rows_fifo, room = rows_fifo + 1, T + 1
        room -= n
    assert sum(lengths) / (T + 1) <= rows_best < rows_fifo


def test_exact_resume_reproduces_the_batches(tok):
    task = EmbeddedChat("train", size=120)
    a = ChatPackingLoader(tok, task, batch_size=3, seq_len=96, loop=True, buffer_size=16)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # it travels through a JSON checkpoint meta
    after = [next(a) for _ in range(40)]  # runs past the end of the first pass
    assert a.epoch >= 1 and a.progress() > 1.0
    b = ChatPackingLoader(tok, task, batch_size=3, seq_len=96, loop=True, buffer_size=16)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, (next(b) for _ in range(40))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.stats() == b.stats()
    with pytest.raises(ValueError, match="same ranks"):
        ChatPackingLoader(tok, task, batch_size=3, seq_len=96, rank=1, world_size=2).load_state_dict(state)


def test_ranks_split_the_conversations(tok):
    task = EmbeddedChat("train", size=101)
    seen = 0
    for rank in range(3):
        loader = ChatPackingLoader(tok, task, batch_size=4, seq_len=128, rank=rank, world_size=3, loop=False)
        list(loader)
        seen += loader.stats()["conversations"]
        assert loader.progress() == 1.0
    assert seen == 101

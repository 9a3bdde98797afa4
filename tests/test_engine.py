"""KV-cache generation against naive full recompute; sampling determinism and stop tokens."""

import math

import pytest
import torch

from nanochat.engine import Engine, KVCache, generate_naive
from nanochat.gpt import GPT, GPTConfig
from tests.chat_helpers import penalized_greedy


def model_for(**kw):
    base = dict(sequence_len=64, vocab_size=50, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    base.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2), dict(n_kv_head=1, window_pattern="SL"),
                                dict(value_embeds=True, resid_scalars=True, n_layer=3)])
def test_greedy_cache_equals_naive(kw):
    model = model_for(**kw)
    prompt = [1, 5, 9, 2, 33, 7]
    naive = generate_naive(model, prompt, 40)  # runs past the short window (16)
    results, masks = Engine(model).generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0,
                                                  stop_tokens=[])
    for r, m in zip(results, masks):
        assert r[:len(prompt)] == prompt
        assert r[len(prompt):] == naive
        assert m == [0] * len(prompt) + [1] * 40


def test_prefill_logits_match_full_forward():
    model = model_for()
    idx = torch.randint(0, 50, (1, 10))
    cache = KVCache.for_model(model, 1, 16)
    with torch.no_grad():
        full = model(idx)
        a = model(idx[:, :7], kv_cache=cache)
        b = model(idx[:, 7:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_samples_differ():
    model = model_for()
    eng = Engine(model)
    r1, _ = eng.generate_batch([1, 2, 3], num_samples=4, max_tokens=20, temperature=1.0, top_k=10, seed=7,
                               stop_tokens=[])
    r2, _ = eng.generate_batch([1, 2, 3], num_samples=4, max_tokens=20, temperature=1.0, top_k=10, seed=7,
                               stop_tokens=[])
    assert r1 == r2
    assert len({tuple(r) for r in r1}) > 1  # several samples in one batch are not copies


def test_top_k_restricts_choices():
    model = model_for()
    eng = Engine(model)
    # with top_k=1 sampling is greedy whatever the temperature
    greedy, _ = eng.generate_batch([4, 4], 2, 15, temperature=0.0, stop_tokens=[])
    top1, _ = eng.generate_batch([4, 4], 2, 15, temperature=2.0, top_k=1, stop_tokens=[])
    assert greedy == top1


def test_stop_tokens_end_a_sample():
    model = model_for()
    naive = generate_naive(model, [3, 1, 4], 30)
    stop = naive[5]
    first = naive.index(stop)
    results, _ = Engine(model).generate_batch([3, 1, 4], 1, 30, temperature=0.0, stop_tokens=[stop])
    assert results[0][3:] == naive[:first]


def test_cache_overflow_is_an_error():
    model = model_for()
    cache = KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


# ---------------------------------------------------------------------------------------------
# tool use, stops, streaming decode: a scripted model and a real (tiny) tokenizer

import threading  # noqa: E402

from nanochat.engine import StreamDecoder  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "What is 12 times 3? It is 36, so the answer is 36.",
         "Count the letters in strawberry: there are 3 r's.", "Hello there, how are you today? I am fine."] * 10


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(TEXTS, vocab_size=300)


class ScriptedModel(torch.nn.Module):
    """Predicts `plan[p + 1]` after position p whatever it is fed, and records what it was fed.

    Stands in for a trained model that has learnt to call the calculator: at the positions where the
    engine must force the tool's output, `plan` holds a decoy, so a forced token is visible as such.
    """

    def __init__(self, plan: list[int], vocab_size: int, sequence_len: int = 64):
        super().__init__()
        self.config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                                n_embd=8)
        self.compute_dtype = torch.float32
        self.plan = plan
        self.fed: list[list[int]] = []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        if not self.fed or t0 == 0:
            self.fed = [[] for _ in range(B)]
        if len(self.fed) != B:
            self.fed = [list(self.fed[0]) for _ in range(B)]  # the prefill cache was expanded
        for b in range(B):
            self.fed[b].extend(idx[b].tolist())
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        for t in range(T):
            nxt = self.plan[min(t0 + t + 1, len(self.plan) - 1)]
            logits[:, t, nxt] = 10.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits


def calculator_script(tok):
    """(prompt, model plan, expected reply tokens, expected masks) for a reply that calls the calculator."""
    sp = tok.encode_special
    prompt = tok.encode("What is 12 times 3?", prepend="<|bos|>") + [sp("<|assistant_start|>")]
    lead = tok.encode("It is ")
    call = [sp("<|python_start|>"), *tok.encode("12*3"), sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *tok.encode("36"), sp("<|output_end|>")]
    tail = tok.encode(", so 36.")
    decoy = tok.encode("x")[0]
    plan = prompt + lead + call + [decoy] * len(output) + tail + [sp("<|assistant_end|>")]
    reply = lead + call + output + tail
    masks = [1] * len(lead + call) + [0] * len(output) + [1] * len(tail)
    return prompt, plan, reply, masks


def test_calculator_call_forces_output_with_mask_0(tok):
    prompt, plan, reply, masks = calculator_script(tok)
    model = ScriptedModel(plan, tok.get_vocab_size())
    results, got_masks = Engine(model, tok).generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    for r, m in zip(results, got_masks):
        assert r == prompt + reply
        assert m == [0] * len(prompt) + masks
    assert tok.decode(results[0][len(prompt):]).endswith("<|output_start|>36<|output_end|>, so 36.")
    # the forced tokens were fed back to the model (they are in its context from then on)
    assert model.fed[0][len(prompt):] == reply


def test_tools_off_forces_nothing(tok):
    prompt, plan, reply, masks = calculator_script(tok)
    results, got_masks = Engine(ScriptedModel(plan, tok.get_vocab_size()), tok).generate_batch(
        prompt, max_tokens=40, temperature=0.0, tools=False)
    assert 0 not in got_masks[0][len(prompt):]
    assert results[0][len(prompt):] == plan[len(prompt):-1]  # the decoys come through unchanged


def test_refused_expression_forces_nothing(tok):
    sp = tok.encode_special
    prompt = [sp("<|bos|>"), sp("<|assistant_start|>")]
    call = [sp("<|python_start|>"), *tok.encode("open(1)"), sp("<|python_end|>")]
    tail = tok.encode("ok")
    plan = prompt + call + tail + [sp("<|assistant_end|>")]
    results, masks = Engine(ScriptedModel(plan, tok.get_vocab_size()), tok).generate_batch(prompt, max_tokens=30,
                                                                                           temperature=0.0)
    assert results[0] == plan[:-1] and set(masks[0][len(prompt):]) == {1}


def test_tool_use_from_worker_threads(tok):
    """The web server generates from worker threads: each gets the forced tokens (no SIGALRM anywhere)."""
    prompt, plan, reply, masks = calculator_script(tok)
    out, errors = {}, []

    def work(i):
        try:
            engine = Engine(ScriptedModel(plan, tok.get_vocab_size()), tok)
            out[i] = engine.generate_batch(prompt, max_tokens=40, temperature=1.0, top_k=5, seed=i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for results, got_masks in out.values():
        assert results[0] == prompt + reply and got_masks[0] == [0] * len(prompt) + masks


def test_generate_yields_tokens_masks_and_stops(tok):
    prompt, plan, reply, masks = calculator_script(tok)
    steps = list(Engine(ScriptedModel(plan, tok.get_vocab_size()), tok).generate(prompt, max_tokens=40,
                                                                                  temperature=0.0))
    assert [ids[0] for ids, _ in steps] == reply + [tok.encode_special("<|assistant_end|>")]  # stop token yielded
    assert [m[0] for _, m in steps] == masks + [1]


def test_finished_samples_yield_none_and_should_stop_cancels():
    model = model_for()
    eng = Engine(model)
    stops = set(range(10))
    steps = list(eng.generate([1, 2, 3], num_samples=4, max_tokens=30, temperature=1.0, seed=3, stop_tokens=stops))
    ended = []
    for i in range(4):
        column = [(ids[i], m[i]) for ids, m in steps]
        end = next(j for j, (t, m) in enumerate(column) if t in stops)
        assert all(m == 1 for _, m in column[:end + 1])
        assert column[end + 1:] == [(None, 0)] * (len(column) - end - 1)
        ended.append(end)
    assert len(set(ended)) > 1 and len(steps) == max(ended) + 1  # ends when the last sample does
    calls = []
    steps = list(eng.generate([1, 2, 3], max_tokens=30, temperature=0.0, stop_tokens=[],
                              should_stop=lambda: len(calls.append(0) or calls) > 5))
    assert len(steps) == 5


def test_context_limit_stops_without_error():
    model = model_for(sequence_len=16)
    results, masks = Engine(model).generate_batch(list(range(1, 11)), max_tokens=100, temperature=0.0, stop_tokens=[])
    assert len(results[0]) == 16  # prompt + reply fill the context exactly
    assert results[0][10:] == generate_naive(model, list(range(1, 11)), 6)
    assert len(list(Engine(model).generate([1] * 15, max_tokens=5, stop_tokens=[]))) == 1
    assert list(Engine(model).generate([1] * 16, max_tokens=5)) == []  # the context is full: no reply
    assert list(Engine(model).generate([1] * 70, max_tokens=5)) == []  # nor past it (rotary table: 64)


def test_top_p_keeps_the_nucleus():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    from nanochat.engine import sample_next

    picks = sample_next(logits, 1.0, None, gen, top_p=0.7)[:, 0]
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert abs((picks == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert set(sample_next(logits, 1.0, None, gen, top_p=0.3)[:, 0].tolist()) == {0}


def test_stream_decoder_keeps_multibyte_characters_whole(tok):
    text = "Emoji 😀 and 🎉🇫🇷, accents héllo, 日本語, done."
    ids = tok.encode(text)
    # this tokenizer never saw these characters: they are split into byte tokens
    assert any(not _is_utf8(tok.decode_bytes([i])) for i in ids)
    naive = "".join(tok.decode([i]) for i in ids)
    assert naive != text and "\ufffd" in naive  # token-by-token decoding garbles them
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # held back while a character was incomplete


def test_stream_decoder_skips_specials_and_replaces_invalid_bytes(tok):
    dec = StreamDecoder(tok)
    assert dec.push(tok.encode_special("<|assistant_end|>")) == ""
    assert dec.push(0xF0) == "" and dec.push(ord("a")) == "\ufffda"  # a 4-byte lead byte, then ASCII
    assert dec.push(0xE6) == "" and dec.flush() == "\ufffd"  # a dangling partial character at the end
    assert StreamDecoder(tok, skip_special=False).push(tok.encode_special("<|bos|>")) == "<|bos|>"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------------------------
# many prompts decoded together (SlotKVCache rows at their own positions)

from nanochat.engine import SlotKVCache  # noqa: E402

PROMPTS = [[1, 5, 9], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [7, 7], [40, 2, 9, 1, 1],
           [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31, 32, 33]]


def _one_at_a_time(model, prompts, caps, stops, **kw):
    out = []
    for p, cap in zip(prompts, caps):
        seqs, masks = Engine(model).generate_batch(p, max_tokens=cap, stop_tokens=stops, **kw)
        out.append((seqs[0][len(p):], masks[0][len(p):]))
    return out


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2), dict(n_kv_head=1, window_pattern="SL"),
                                dict(value_embeds=True, resid_scalars=True, n_layer=3)])
def test_generate_many_greedy_equals_one_prompt_at_a_time(kw):
    model = model_for(**kw)
    caps = [30, 12, 40, 25, 3, 33, 18]  # rows finish at different steps: refills, then compaction
    stops = {4, 17}
    expect = _one_at_a_time(model, PROMPTS, caps, stops, temperature=0.0)
    assert len({len(r) for r, _ in expect}) > 3  # the rows really do end at different times
    for batch_size in (1, 3, 16):
        got = {}
        for i, toks, masks in Engine(model).generate_many(PROMPTS, max_tokens=caps, temperature=0.0,
                                                          stop_tokens=stops, batch_size=batch_size):
            assert i not in got
            got[i] = (toks, masks)
        assert [got[i] for i in range(len(PROMPTS))] == expect, batch_size


def test_slot_cache_decode_logits_match_single_rows():
    model = model_for(n_kv_head=2, window_pattern="SL", value_embeds=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [9, 8], [5, 5, 5, 5, 5]]
    slots = SlotKVCache.for_model(model, len(prompts), 32)
    with torch.no_grad():
        singles = []
        for s, p in enumerate(prompts):
            one = KVCache.for_model(model, 1, 32)
            model(torch.tensor([p]), kv_cache=one)
            slots.load(s, one)
            singles.append(one)
        nxt = torch.tensor([[3], [4], [6]])
        batched = model(nxt, kv_cache=slots)[:, -1]
        for s, one in enumerate(singles):
            single = model(nxt[s:s + 1], kv_cache=one)[0, -1]
            torch.testing.assert_close(batched[s], single, rtol=1e-5, atol=1e-5)
    assert slots.lengths == [21, 3, 6]
    slots.release(1)
    slots.keep([2, 0])
    assert slots.lengths == [6, 21] and slots.slots == 2 and slots.pos.tolist() == [6, 21]


def test_generate_many_sampling_does_not_depend_on_the_batch():
    model = model_for()
    caps = [20] * len(PROMPTS)
    runs = []
    for batch_size in (1, 4):
        got = {i: toks for i, toks, _ in Engine(model).generate_many(PROMPTS, max_tokens=caps, temperature=1.0,
                                                                     top_k=20, seeds=7, stop_tokens=[],
                                                                     batch_size=batch_size)}
        runs.append([got[i] for i in range(len(PROMPTS))])
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs[0]}) == len(PROMPTS)
    other = {i: t for i, t, _ in Engine(model).generate_many(PROMPTS, max_tokens=caps, temperature=1.0, top_k=20,
                                                             seeds=8, stop_tokens=[])}
    assert [other[i] for i in range(len(PROMPTS))] != runs[0]  # the seed matters


def test_generate_many_context_limit_and_bad_input():
    model = model_for(sequence_len=16)
    got = {i: t for i, t, _ in Engine(model).generate_many([[1] * 16, list(range(1, 11)), [1] * 15], max_tokens=100,
                                                           temperature=0.0, stop_tokens=[])}
    assert got[0] == []  # the context is full
    assert got[1] == generate_naive(model, list(range(1, 11)), 6)
    assert len(got[2]) == 1
    with pytest.raises(ValueError, match="non-empty"):
        list(Engine(model).generate_many([[1], []]))
    with pytest.raises(ValueError, match="one per prompt"):
        list(Engine(model).generate_many([[1], [2]], max_tokens=[3]))
    with pytest.raises(ValueError, match="batch_size"):
        list(Engine(model).generate_many([[1]], batch_size=0))
    calls = []
    out = list(Engine(model).generate_many([[1], [2]], max_tokens=10, temperature=0.0, stop_tokens=[],
                                           should_stop=lambda: len(calls.append(0) or calls) > 3))
    assert out == []  # cancelled before any row finished


class SlotScriptedModel(ScriptedModel):
    """ScriptedModel for per-row positions: row b at position p predicts plan_b[p + 1]."""

    def __init__(self, plans: dict[int, list[int]], vocab_size: int):
        super().__init__(next(iter(plans.values())), vocab_size)
        self.plans = plans  # first prompt token -> plan

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        pos = kv_cache.pos
        prefill = not isinstance(pos, torch.Tensor) and pos == 0
        pos = pos.tolist() if isinstance(pos, torch.Tensor) else [pos] * B
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        if prefill:  # a batch-1 prefill: the row's plan key travels in its cache
            kv_cache.k[0, 0, 0, 0, 0] = float(int(idx[0, 0]))
        for b in range(B):  # decoding (a SlotKVCache, or a plain view when all rows sit at one position)
            key = int(idx[0, 0]) if prefill else int(kv_cache.k[0, b, 0, 0, 0])
            plan = self.plans.get(key)
            for t in range(T):
                if plan is not None:
                    logits[b, t, plan[min(pos[b] + t + 1, len(plan) - 1)]] = 10.0
        kv_cache.advance(T)
        return logits


def test_generate_many_forces_tool_output_per_row(tok):
    prompt, plan, reply, masks = calculator_script(tok)
    sp = tok.encode_special
    other = tok.encode("Say hi", prepend="<|bos|>")
    other[0] = tok.encode("x")[0]  # its own first token selects its own plan
    other_reply = tok.encode("hi there")
    plans = {prompt[0]: plan, other[0]: other + other_reply + [sp("<|assistant_end|>")]}
    engine = Engine(SlotScriptedModel(plans, tok.get_vocab_size()), tok)
    got = {i: (t, m) for i, t, m in engine.generate_many([prompt, other, prompt], max_tokens=40, temperature=0.0,
                                                         batch_size=2)}
    assert got[0] == (reply, masks) and got[2] == (reply, masks)
    assert got[1] == (other_reply, [1] * len(other_reply))


# ---------------------------------------------------------------------------------------------
# BatchDecoder: sequences added and dropped while decoding (the chat server's continuous batching)

from nanochat.engine import BatchDecoder  # noqa: E402


def _alone(model, prompt, cap, stops, **kw):
    """What Engine.generate gives one prompt: (tokens, masks), the stop token included."""
    out = [(ids[0], m[0]) for ids, m in Engine(model).generate(prompt, max_tokens=cap, stop_tokens=stops, **kw)]
    return [t for t, _ in out], [m for _, m in out]


def _drive(decoder, jobs, drop_after=None):
    """Admit `jobs` [(prompt, cap, kwargs)] whenever a row is free, step until all finish; {job: (tokens,
    masks)}. `drop_after` (job, steps): that job is dropped after it has produced that many tokens."""
    queue, got, key_of, done = list(range(len(jobs))), {}, {}, set()
    while queue or decoder.seqs:
        while queue and decoder.free:
            j = queue.pop(0)
            prompt, cap, kw = jobs[j]
            key = decoder.add(prompt, cap, **kw)
            got[j] = ([], [])
            if key is None:
                done.add(j)
            else:
                key_of[key] = j
        for ev in decoder.step():
            key, j = ev.key, key_of[ev.key]
            got[j][0].append(ev.token)
            got[j][1].append(ev.mask)
            if ev.finished:
                done.add(j)
            elif drop_after is not None and j == drop_after[0] and len(got[j][0]) == drop_after[1]:
                decoder.drop(key)
                done.add(j)
    assert done == set(range(len(jobs)))
    return got


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=2), dict(n_kv_head=1, window_pattern="SL"),
                                dict(value_embeds=True, resid_scalars=True, n_layer=3)])
def test_batch_decoder_greedy_equals_one_prompt_at_a_time(kw):
    model = model_for(**kw)
    caps = [30, 12, 40, 25, 3, 33, 18]  # rows finish at different steps and are refilled mid-flight
    stops = {4, 17}
    expect = [_alone(model, p, c, stops, temperature=0.0) for p, c in zip(PROMPTS, caps)]
    assert len({len(t) for t, _ in expect}) > 3
    for rows in (1, 3, 16):
        decoder = BatchDecoder(Engine(model), rows, stop_tokens=stops)
        got = _drive(decoder, [(p, c, dict(temperature=0.0)) for p, c in zip(PROMPTS, caps)])
        assert [got[j] for j in range(len(PROMPTS))] == expect, rows
        assert decoder.free == rows and decoder.cache.lengths == [0] * rows


def test_batch_decoder_drop_frees_the_row_and_leaves_the_others_alone():
    model = model_for(n_kv_head=2)
    caps = [20] * 5
    expect = [_alone(model, p, c, set(), temperature=0.0) for p, c in zip(PROMPTS[:5], caps)]
    got = _drive(BatchDecoder(Engine(model), 3, stop_tokens=[]),
                 [(p, c, dict(temperature=0.0)) for p, c in zip(PROMPTS[:5], caps)], drop_after=(0, 4))
    assert got[0][0] == expect[0][0][:4]
    assert [got[j] for j in range(1, 5)] == expect[1:]


def test_batch_decoder_sampling_does_not_depend_on_the_batch():
    model = model_for()
    jobs = [(p, 20, dict(temperature=1.0, top_k=20, seed=7 + j)) for j, p in enumerate(PROMPTS)]
    runs = [_drive(BatchDecoder(Engine(model), rows, stop_tokens=[]), jobs) for rows in (1, 4)]
    assert runs[0] == runs[1]
    assert len({tuple(runs[0][j][0]) for j in range(len(PROMPTS))}) == len(PROMPTS)
    # mixed settings in one batch: a greedy row next to sampled ones is still the greedy reply
    mixed = _drive(BatchDecoder(Engine(model), 4, stop_tokens=[]),
                   [jobs[0], (PROMPTS[1], 20, dict(temperature=0.0)), jobs[2]])
    assert mixed[1] == _alone(model, PROMPTS[1], 20, set(), temperature=0.0)
    assert mixed[0] == runs[0][0] and mixed[2] == runs[0][2]


def test_batch_decoder_context_limit_and_bad_input():
    model = model_for(sequence_len=16)
    decoder = BatchDecoder(Engine(model), 2, stop_tokens=[])
    assert decoder.add([1] * 16, 10, temperature=0.0) is None  # the context is full: no reply
    got = _drive(decoder, [(list(range(1, 11)), 100, dict(temperature=0.0))])
    assert got[0][0] == generate_naive(model, list(range(1, 11)), 6)
    with pytest.raises(ValueError, match="non-empty"):
        decoder.add([], 5)
    decoder.add([1], 5)
    decoder.add([2], 5)
    with pytest.raises(RuntimeError, match="rows are busy"):
        decoder.add([3], 5)
    with pytest.raises(ValueError, match="rows must be"):
        BatchDecoder(Engine(model), 0)


def test_batch_decoder_forces_tool_output_per_row(tok):
    prompt, plan, reply, masks = calculator_script(tok)
    sp = tok.encode_special
    other = tok.encode("Say hi", prepend="<|bos|>")
    other[0] = tok.encode("x")[0]
    other_reply = tok.encode("hi there")
    end = sp("<|assistant_end|>")
    plans = {prompt[0]: plan, other[0]: other + other_reply + [end]}
    decoder = BatchDecoder(Engine(SlotScriptedModel(plans, tok.get_vocab_size()), tok), 2)
    got = _drive(decoder, [(prompt, 40, dict(temperature=0.0)), (other, 40, dict(temperature=0.0)),
                           (prompt, 40, dict(temperature=0.0))])
    assert got[0] == (reply + [end], masks + [1]) and got[2] == got[0]
    assert got[1] == (other_reply + [end], [1] * (len(other_reply) + 1))


# ---------------------------------------------------------------------------------------------
# the per-row rules every generator shares: stop strings, logprobs, penalties, forks, prompt scores

import random  # noqa: E402

from nanochat.engine import StopText  # noqa: E402


@pytest.mark.parametrize("seed", range(20))
def test_stop_text_releases_exactly_the_text_before_the_first_stop(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c") for _ in range(40))
    stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    cuts = [text.find(s) for s in stops if s in text]
    expect = text[:min(cuts)] if cuts else text
    m, out, i = StopText(stops), "", 0
    while i < len(text):  # pieces of random sizes, as tokens decode
        j = i + rng.randint(1, 5)
        out += m.push(text[i:j])
        assert expect.startswith(out)  # never more than the answer, at any point of the stream
        i = j
    if not m.hit:
        out += m.flush()
    assert out == expect and m.hit == bool(cuts)


def test_stop_strings_end_generation_on_decoded_text(tok):
    model = model_for(vocab_size=tok.get_vocab_size())
    prompt = tok.encode("Hello", prepend="<|bos|>")
    steps = [ids[0] for ids, _ in Engine(model, tok).generate(prompt, max_tokens=30, temperature=0.0, stop_tokens=[])]
    full = tok.decode(steps)
    stop = full[7:10]  # three characters somewhere in the middle, likely across a token boundary
    got = [ids[0] for ids, _ in Engine(model, tok).generate(prompt, max_tokens=30, temperature=0.0, stop_tokens=[],
                                                             stop=[stop])]
    assert got == steps[:len(got)] and stop in tok.decode(got) and stop not in tok.decode(got[:-1])


def test_logprobs_are_the_raw_model_distribution_and_greedy_picks_the_argmax():
    model = model_for()
    prompt = [1, 5, 9]
    decoder = BatchDecoder(Engine(model), 2, stop_tokens=[])
    greedy = decoder.add(prompt, 8, temperature=0.0, logprobs=5)
    decoder.add(prompt, 8, temperature=1.5, top_k=3, seed=1, logprobs=0)
    events = {greedy: [], 1 - greedy: []}
    while decoder.seqs:
        for ev in decoder.step():
            events[ev.key].append(ev)
    for key, evs in events.items():
        ids = prompt + [e.token for e in evs]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)[len(prompt) - 1:-1]
        for k, e in enumerate(evs):  # before temperature and top-k, whatever the row sampled with
            assert e.logprob == pytest.approx(float(logp[k, e.token]), abs=1e-4)
            if key == greedy:
                assert e.top[0][0] == e.token and len(e.top) == 5
                assert sum(math.exp(v) for _, v in e.top) <= 1 + 1e-6
            else:
                assert e.top is None


@pytest.mark.parametrize("presence,frequency", [(1.0, 0.0), (0.0, 0.8), (-0.5, 1.2)])
def test_penalties_follow_openais_formula(presence, frequency):
    model = model_for(vocab_size=12)  # a small vocabulary: tokens repeat, so the penalties bite
    prompt = [1, 2, 3]
    expect = penalized_greedy(model, prompt, 25, presence, frequency)
    assert expect != penalized_greedy(model, prompt, 25, 0.0, 0.0)
    got = [ids[0] for ids, _ in Engine(model).generate(prompt, max_tokens=25, temperature=0.0, stop_tokens=[],
                                                        presence_penalty=presence, frequency_penalty=frequency)]
    assert got == expect


def test_forked_samples_equal_separately_added_ones():
    model = model_for()
    jobs = [([3, 1, 4], 15, dict(temperature=1.0, top_k=20, seed=s)) for s in (5, 6, 7)]
    alone = _drive(BatchDecoder(Engine(model), 3, stop_tokens=[]), jobs)
    decoder = BatchDecoder(Engine(model), 3, stop_tokens=[])
    first = decoder.add([3, 1, 4], 15, temperature=1.0, top_k=20, seed=5)
    keys = [first, decoder.fork(first, 6), decoder.fork(first, 7)]
    got = {k: [] for k in keys}
    while decoder.seqs:
        for ev in decoder.step():
            got[ev.key].append(ev.token)
    assert [got[k] for k in keys] == [alone[j][0] for j in range(3)]
    with pytest.raises(ValueError, match="not in the batch"):
        decoder.fork(first, 1)


def test_score_equals_per_token_loss():
    from nanochat.loss_eval import per_token_loss

    model = model_for(n_kv_head=2)
    ids = [1, 5, 9, 2, 33, 7, 7, 40, 2]
    scores = BatchDecoder(Engine(model), 1).score(ids, top=3)
    with torch.no_grad():
        loss = per_token_loss(model, torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0]
    assert [lp for lp, _ in scores] == pytest.approx((-loss).tolist(), abs=1e-5)
    assert all(len(top) == 3 and top[0][1] >= lp for lp, top in scores)

"""CORE evaluation: prompt rendering, continuation spans, scoring rules, batching, distribution, the bundle.

Independent references: hand-written expected prompts, the materialised-list few-shot sampler of the
reference implementation, a bigram "model" whose losses are computed by hand, the unbatched path
(one example per forward) and a single-process run.
"""

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from nanochat import core_eval as ce
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer
from tests.helpers import free_port

# ---------------------------------------------------------------------------------------------
# helpers: a byte-level tokenizer, a small random GPT, a synthetic bundle


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([b]): b for b in range(256)})


def small_gpt(vocab_size: int, seq_len: int = 512, n_embd: int = 16, n_layer: int = 1, seed: int = 0) -> GPT:
    """A random GPT whose logits are far from uniform (the stock init has a near-zero head), so that
    choices differ by clear margins and batched/unbatched float noise cannot flip a decision."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_kv_head=2,
                          n_embd=n_embd))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.normal_(0.0, 0.3 if "lm_head" in name else p.size(1) ** -0.5)
    return model.eval()


def _words(rng: random.Random, n: int) -> str:
    vocab = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "cloud", "fire", "leaf"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def make_bundle(root: Path, n: int = 14, missing: tuple[str, ...] = ()) -> Path:
    """A bundle with one task of each type (+ a task whose file is absent when listed in `missing`)."""
    rng = random.Random(0)
    bundle = root / "bundle"
    (bundle / "eval_data" / "synthetic").mkdir(parents=True)
    rows = {
        "mc": [{"query": f"Question: {_words(rng, 4)}?", "choices": [_words(rng, 2) for _ in range(3)],
                "gold": rng.randrange(3)} for _ in range(n)],
        "schema": [{"context_options": [f"{_words(rng, 3)} {w}" for w in ("he", "she")],
                    "continuation": _words(rng, 3), "gold": rng.randrange(2)} for _ in range(n)],
        "lm": [{"context": f"{_words(rng, 5)} ", "continuation": _words(rng, 1)} for _ in range(n)],
    }
    tasks = [("syn_mc", "multiple_choice", "mc", 2, "\nAnswer: ", 33.3),
             ("syn_schema", "schema", "schema", 0, " ", 50.0),
             ("syn_lm", "language_modeling", "lm", 3, " ", 0.0),
             ("syn_gone", "language_modeling", "gone", 0, " ", 0.0)]
    yaml_lines, csv_lines = ["icl_tasks:"], ["Eval Task,Random baseline"]
    for label, kind, name, shots, delim, rb in tasks:
        if name != "gone" or "syn_gone" in missing:
            yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: synthetic/{name}.jsonl",
                           f"  num_fewshot: [{shots}]", f"  icl_task_type: {kind}",
                           f"  continuation_delimiter: {json.dumps(delim)}"]
            csv_lines.append(f"{label},{rb}")
        if name in rows:
            with open(bundle / "eval_data" / "synthetic" / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[name])
    (bundle / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    (bundle / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n")
    return bundle


class BigramModel(nn.Module):
    """logits[b, t] = table[idx[b, t]]: every loss can be computed by hand from the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, idx):
        return self.table[idx]


# ---------------------------------------------------------------------------------------------
# prompts


def test_render_mc_built_rows():
    item = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shots = [{"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0}, {"query": "Q: 3+3?", "choices": ["1", "6"], "gold": 1}]
    got = ce.render_prompts_mc(item, "\nAnswer: ", shots)
    head = "Q: 1+1?\nAnswer: 2\n\nQ: 3+3?\nAnswer: 6\n\n"
    assert got == [head + "Q: 2+2?\nAnswer: 3", head + "Q: 2+2?\nAnswer: 4"]
    assert ce.render_prompts_mc(item, " ") == ["Q: 2+2? 3", "Q: 2+2? 4"]


def test_render_schema_built_rows():
    item = {"context_options": ["Tom hit Bob because Tom", "Tom hit Bob because Bob"], "continuation": "was angry.", "gold": 0}
    shot = {"context_options": ["A saw B so A", "A saw B so B"], "continuation": "waved.", "gold": 1}
    got = ce.render_prompts_schema(item, " ", [shot])
    assert got == ["A saw B so B waved.\n\nTom hit Bob because Tom was angry.",
                   "A saw B so B waved.\n\nTom hit Bob because Bob was angry."]


def test_render_lm_trims_contexts_and_strips_prompt_without():
    item = {"context": "  The sky is ", "continuation": "blue"}
    shot = {"context": "Grass is \n", "continuation": "green"}
    without, with_ = ce.render_prompts_lm(item, " ", [shot])
    assert with_ == "Grass is green\n\nThe sky is blue"
    assert without == "Grass is green\n\nThe sky is"  # trailing delimiter stripped: " blue" stays one unit
    assert ce.render_prompts_lm(item, "\nAnswer: ") == ["The sky is\nAnswer:", "The sky is\nAnswer: blue"]


@pytest.mark.parametrize("n,idx,k", [(14, 0, 10), (14, 13, 10), (50, 7, 3), (300, 299, 10), (12000, 5, 10), (3, 1, 2)])
def test_fewshot_sampling_matches_materialised_list(n, idx, k):
    # the reference builds the full list of other indices; the lazy sequence must draw the same ones
    reference = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
    assert ce.fewshot_indices(n, idx, k) == reference
    assert idx not in reference


def _real_task(shared_data, task_type):
    """The task of this type with the most shots, preferring a non-default delimiter."""
    bundle = shared_data / "eval_bundle"
    specs = sorted((s for s in ce.load_task_specs(bundle) if s.task_type == task_type),
                   key=lambda s: (-s.num_fewshot, s.continuation_delimiter == " "))
    for spec in specs:
        data = ce.load_task_data(bundle, spec, 50)
        if data is not None:
            return spec, data
    pytest.skip(f"no {task_type} task in the shared bundle")


@pytest.mark.parametrize("task_type", ["multiple_choice", "schema", "language_modeling"])
def test_render_real_rows(shared_data, task_type):
    spec, data = _real_task(shared_data, task_type)
    idx = 3
    shots = [data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], spec.num_fewshot)]
    prompts = ce.render_example(data, idx, spec)
    d, item = spec.continuation_delimiter, data[idx]
    if task_type == "multiple_choice":
        head = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        assert prompts == [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    elif task_type == "schema":
        head = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        assert prompts == [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    else:
        head = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
        assert prompts == [(head + item["context"].strip() + d).strip(), f"{head}{item['context'].strip()}{d}{item['continuation']}"]


def test_load_task_data_shuffles_with_seed_1337(shared_data):
    bundle = shared_data / "eval_bundle"
    spec = next(s for s in ce.load_task_specs(bundle) if s.label == "copa")
    with open(bundle / "eval_data" / spec.dataset_uri) as f:
        rows = [json.loads(line) for line in f]
    random.Random(1337).shuffle(rows)
    assert ce.load_task_data(bundle, spec, 20) == rows[:20]
    assert ce.load_task_data(bundle, spec) == rows


# ---------------------------------------------------------------------------------------------
# spans, cropping, scoring rules


def test_continuation_spans():
    seqs, s, e = ce.continuation_spans("multiple_choice", [[9, 1, 2, 3], [9, 1, 2, 4, 5]])
    assert (s, e) == ([3, 3], [4, 5])
    seqs, s, e = ce.continuation_spans("schema", [[9, 1, 7, 8], [9, 2, 3, 7, 8]])
    assert (s, e) == ([2, 3], [4, 5])
    seqs, s, e = ce.continuation_spans("language_modeling", [[9, 1, 2], [9, 1, 2, 6, 7]])
    assert (seqs, s, e) == ([[9, 1, 2, 6, 7]], [3], [5])


def test_crop_left_shifts_the_scored_span():
    t = list(range(10))
    assert ce.crop_left(t, 7, 10, 6) == ([4, 5, 6, 7, 8, 9], 3, 6)
    assert ce.crop_left(t, 7, 10, None) == (t, 7, 10)
    assert ce.crop_left(t, 2, 10, 4) == ([6, 7, 8, 9], 1, 4)  # continuation longer than the window


def _bigram_table(V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, V, generator=g) * 2


def _hand_mean_loss(table, seq, s, e):
    losses = [-torch.log_softmax(table[seq[p - 1]], -1)[seq[p]].item() for p in range(s, e)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("batched", [False, True])
def test_multiple_choice_picks_lowest_mean_loss(batched):
    table = _bigram_table()
    model = BigramModel(table)
    seqs = [[0, 1, 2, 3], [0, 1, 2, 4, 5], [0, 1, 2, 5]]
    ex = ce.PreparedExample(idx=0, task_type="multiple_choice", tokens=seqs, starts=[3, 3, 3], ends=[4, 5, 4], gold=1)
    (d,) = ce.run_examples(model, [ex], pad_id=0, device="cpu", batched=batched)
    hand = [_hand_mean_loss(table, t, 3, len(t)) for t in seqs]
    assert d["scores"] == pytest.approx(hand, abs=1e-5)
    assert d["pred"] == hand.index(min(hand))
    assert d["correct"] == (d["pred"] == 1)


def test_language_modeling_needs_every_token_greedy():
    table = torch.full((6, 6), -5.0)
    chain = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 0}  # greedy next token of each token
    for a, b in chain.items():
        table[a, b] = 5.0
    model = BigramModel(table)

    def lm(tokens, start):
        return ce.PreparedExample(idx=0, task_type="language_modeling", tokens=[tokens], starts=[start], ends=[len(tokens)])

    all_right = lm([0, 1, 2, 3, 4], 2)
    last_wrong = lm([0, 1, 2, 3, 0], 2)
    first_wrong = lm([0, 1, 5, 0, 1], 2)
    context_wrong = lm([0, 3, 4, 5], 2)  # only the continuation counts
    got = [d["correct"] for d in ce.run_examples(model, [all_right, last_wrong, first_wrong, context_wrong], 0, "cpu")]
    assert got == [True, False, False, True]


def test_centering_and_aggregation():
    assert ce.centered_score(0.25, 25.0) == pytest.approx(0.0)
    assert ce.centered_score(1.0, 25.0) == pytest.approx(1.0)
    assert ce.centered_score(0.5, 25.0) == pytest.approx(1 / 3)
    assert ce.centered_score(0.1, 0.0) == pytest.approx(0.1)
    assert ce.centered_score(0.4, 50.0) == pytest.approx(-0.2)
    tasks = {"a": {"centered": 0.2}, "b": {"centered": -0.1}, "c": {"centered": 0.5}}
    assert ce.aggregate_core(tasks) == pytest.approx(0.2)
    assert math.isnan(ce.aggregate_core({}))


def test_pack_rows_respects_the_token_budget():
    lengths = [5, 90, 30, 31, 200, 7, 64]
    groups = ce.pack_rows(lengths, batch_tokens=128)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 128


# ---------------------------------------------------------------------------------------------
# batched == unbatched, end to end


def test_synthetic_bundle_batched_equals_unbatched(tmp_path):
    bundle = make_bundle(tmp_path)
    tok = byte_tokenizer()
    model = small_gpt(tok.get_vocab_size())
    kw = dict(bundle_dir=bundle, verbose=False, base_dir=tmp_path)
    ref = ce.evaluate_core(model, tok, "cpu", batched=False, dump_examples=tmp_path / "ref.jsonl", **kw)
    fast = ce.evaluate_core(model, tok, "cpu", batched=True, batch_tokens=600, dump_examples=tmp_path / "fast.jsonl",
                            max_seq_len=64, **kw)
    crop = ce.evaluate_core(model, tok, "cpu", batched=False, max_seq_len=64, **kw)
    assert ref["n_tasks"] == 3 and ref["n_examples"] == 42
    ref_rows = [json.loads(line) for line in open(tmp_path / "ref.jsonl")]
    fast_rows = [json.loads(line) for line in open(tmp_path / "fast.jsonl")]
    assert len(ref_rows) == 42 and {r["task"] for r in ref_rows} == {"syn_mc", "syn_schema", "syn_lm"}
    assert ref["max_seq_len"] == 512 and fast["tasks"]["syn_mc"]["cropped"] > 0
    assert {k: v["correct"] for k, v in crop["tasks"].items()} == {k: v["correct"] for k, v in fast["tasks"].items()}
    # uncropped batched vs unbatched: same decisions
    again = ce.evaluate_core(model, tok, "cpu", batched=True, batch_tokens=600, dump_examples=tmp_path / "b.jsonl", **kw)
    b_rows = [json.loads(line) for line in open(tmp_path / "b.jsonl")]
    assert [(r["task"], r["idx"], r["correct"], r.get("pred")) for r in b_rows] == \
           [(r["task"], r["idx"], r["correct"], r.get("pred")) for r in ref_rows]
    for a, b in zip(ref_rows, b_rows):
        assert a.get("scores", []) == pytest.approx(b.get("scores", []), abs=1e-4)
    assert again["core"] == ref["core"]
    assert len(fast_rows) == 42


def test_real_examples_batched_equals_unbatched(shared_data):
    """12 real examples from each of the 21 present tasks, prompts cropped to 128 tokens; the 0-shot
    multiple-choice tasks also uncropped through the shared-context (KV cache) path."""
    bundle = shared_data / "eval_bundle"
    specs = ce.load_task_specs(bundle)
    datasets = {s.label: ce.load_task_data(bundle, s, 12) for s in specs}
    texts = [json.dumps(r) for s in specs for r in (ce.load_task_data(bundle, s, 40) or [])]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=512)
    model = small_gpt(tok.get_vocab_size(), seq_len=128)
    pad = tok.get_bos_token_id()
    n, n_cropped, n_shared = 0, 0, 0
    for spec in specs:
        data = datasets[spec.label]
        if data is None:
            continue
        examples = ce.prepare_examples(data, list(range(len(data))), spec, tok, max_seq_len=128)
        ref = ce.run_examples(model, examples, pad, "cpu", batched=False)
        fast = ce.run_examples(model, examples, pad, "cpu", batched=True, batch_tokens=4096)
        for a, b in zip(ref, fast):
            assert (a["correct"], a.get("pred")) == (b["correct"], b.get("pred")), (spec.label, a, b)
            assert a.get("scores", []) == pytest.approx(b.get("scores", []), abs=1e-4)
        n += len(data)
        n_cropped += sum(ex.cropped for ex in examples)
        if spec.task_type == "multiple_choice" and spec.num_fewshot == 0:  # short enough to run uncropped
            whole = ce.prepare_examples(data, list(range(len(data))), spec, tok)
            ref = ce.run_examples(model, whole, pad, "cpu", batched=False)
            shared = ce.run_examples(model, whole, pad, "cpu", share_prefix=True, min_shared_tokens=1)
            assert [(d["pred"], d["correct"]) for d in shared] == [(d["pred"], d["correct"]) for d in ref], spec.label
            n_shared += len(whole)
    assert n >= 250 and n_cropped > 0 and n_shared >= 24


def test_missing_task_is_reported_and_core_uses_the_rest(tmp_path):
    bundle = make_bundle(tmp_path, missing=("syn_gone",))
    tok = byte_tokenizer()
    out = ce.evaluate_core(small_gpt(tok.get_vocab_size()), tok, "cpu", bundle, verbose=False, base_dir=tmp_path)
    assert out["missing"] == ["syn_gone"] and out["n_tasks"] == 3 and out["n_tasks_total"] == 4
    assert "syn_gone" not in out["tasks"]
    assert out["core"] == pytest.approx(sum(t["centered"] for t in out["tasks"].values()) / 3)


def test_shared_bundle_missing_coqa(shared_data, capsys):
    tok = byte_tokenizer()
    out = ce.evaluate_core(small_gpt(tok.get_vocab_size(), seq_len=128), tok, "cpu", shared_data / "eval_bundle",
                           max_per_task=12, tasks=["coqa", "copa"])
    assert out["missing"] == ["coqa"] and list(out["tasks"]) == ["copa"] and out["n_examples"] == 12
    assert out["core"] == pytest.approx(out["tasks"]["copa"]["centered"])
    printed = capsys.readouterr().out
    assert "coqa" in printed and "MISSING" in printed and "CORE over 1 of 2 tasks" in printed


def test_bad_arguments_fail_clearly(tmp_path):
    bundle = make_bundle(tmp_path)
    tok = byte_tokenizer()
    model = small_gpt(tok.get_vocab_size())
    with pytest.raises(ValueError, match="max_per_task=2 is too small"):
        ce.evaluate_core(model, tok, "cpu", bundle, max_per_task=2, verbose=False)
    with pytest.raises(ValueError, match="unknown CORE task"):
        ce.evaluate_core(model, tok, "cpu", bundle, tasks=["nope"], verbose=False)


# ---------------------------------------------------------------------------------------------
# distributed: 2 gloo processes == 1 process


def _dist_worker(rank, world, port, bundle, out_dir):
    import torch.distributed as dist

    from nanochat.loss_eval import evaluate_bpb

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tok = byte_tokenizer()
        model = small_gpt(tok.get_vocab_size())
        out = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False, base_dir=out_dir,
                               dump_examples=Path(out_dir) / "dist.jsonl")
        # bpb: rank r takes batches r, r+W, ... of the same 4 batches
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 256, (2, 9), generator=g) for _ in range(4)]
        mine = [(b[:, :-1], b[:, 1:]) for b in batches[rank::world]]
        bpb = evaluate_bpb(model, mine, len(mine), tok.token_bytes())
        with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
            json.dump({"core": out, "bpb": bpb}, f)
    finally:
        dist.destroy_process_group()


def test_two_process_core_and_bpb_equal_one_process(tmp_path):
    from nanochat.loss_eval import evaluate_bpb

    bundle = make_bundle(tmp_path)
    mp.spawn(_dist_worker, args=(2, free_port(), str(bundle), str(tmp_path)), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    tok = byte_tokenizer()
    model = small_gpt(tok.get_vocab_size())
    single = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False, dump_examples=tmp_path / "single.jsonl")
    for r in results:
        assert r["core"]["core"] == pytest.approx(single["core"], abs=1e-12)
        for label, t in single["tasks"].items():
            assert r["core"]["tasks"][label]["correct"] == t["correct"]
            assert r["core"]["tasks"][label]["n"] == t["n"]
    dist_rows = [json.loads(line) for line in open(tmp_path / "dist.jsonl")]
    single_rows = [json.loads(line) for line in open(tmp_path / "single.jsonl")]
    assert [(r["task"], r["idx"], r["correct"]) for r in dist_rows] == [(r["task"], r["idx"], r["correct"]) for r in single_rows]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 9), generator=g) for _ in range(4)]
    bpb = evaluate_bpb(model, [(b[:, :-1], b[:, 1:]) for b in batches], 4, tok.token_bytes())
    assert results[0]["bpb"] == pytest.approx(bpb, rel=1e-6) and results[1]["bpb"] == pytest.approx(bpb, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# scripts/base_eval.py: our checkpoints and Hugging Face models through the same code


def _tiny_hf_dir(tmp_path) -> Path:
    """A randomly initialised 1-layer GPT-2 with a byte-level GPT-2 tokenizer (one merge), built offline."""
    transformers = pytest.importorskip("transformers")
    from nanochat.tokenizer import gpt2_byte_to_unicode

    d = tmp_path / "tiny_gpt2"
    d.mkdir()
    vocab = {c: b for b, c in gpt2_byte_to_unicode().items()}
    vocab["\u0120t"] = 256  # "Ġt" = b" t": a 2-byte token
    vocab["<|endoftext|>"] = 257
    from tokenizers import Tokenizer as HFCoreTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    core = HFCoreTokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=258, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=257, eos_token_id=257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def test_hf_wrappers_token_bytes_and_bpb(tmp_path):
    import transformers

    from nanochat.hf_adapters import HFModel, HFTokenizer
    from nanochat.loss_eval import evaluate_bpb

    folder = _tiny_hf_dir(tmp_path)
    model = HFModel(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), 64)
    tok = HFTokenizer(transformers.AutoTokenizer.from_pretrained(folder))
    assert model.max_seq_len == 64 and tok.get_bos_token_id() == 257
    tb = tok.token_bytes()
    assert tb[:256].tolist() == [1] * 256 and tb[256] == 2 and tb[257] == 0
    ids = tok.encode(["a t\xe9", "ok"], prepend=tok.get_bos_token_id())
    assert ids[0][0] == 257 and 256 in ids[0] and len(ids[0]) == 1 + 1 + 1 + 2  # a, " t", é as 2 bytes
    assert tok.decode(ids[0][1:]) == "a t\xe9"
    x = torch.tensor([ids[0][:-1]])
    y = torch.tensor([ids[0][1:]])
    logits = model(x)
    nats = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="sum").item()
    assert evaluate_bpb(model, [(x, y)], 1, tb) == pytest.approx(nats / (math.log(2) * 5), rel=1e-5)


def test_base_eval_hf_path_core(tmp_path, base_dir):
    from scripts.base_eval import load_hf, main

    hf_dir = _tiny_hf_dir(tmp_path)
    bundle = make_bundle(tmp_path)
    out = tmp_path / "res" / "hf.json"
    result = main(["--hf-path", str(hf_dir), "--eval", "core,sample", "--eval-bundle", str(bundle),
                   "--out", str(out), "--device-type", "cpu"])
    saved = json.loads(out.read_text())
    assert set(saved["tasks"]) == {"syn_mc", "syn_schema", "syn_lm"}
    assert set(saved["tasks"]["syn_mc"]) >= {"accuracy", "centered", "n"} and "train_bpb" in saved
    assert out.with_suffix(".csv").is_file() and "CORE" in out.with_suffix(".md").read_text()
    assert len(saved["samples"]) == 7
    model, tok = load_hf(str(hf_dir), "cpu")
    ref = ce.evaluate_core(model, tok, "cpu", bundle, batched=False, verbose=False)  # crops to n_positions=64
    assert saved["core"] == pytest.approx(ref["core"]) and result["core"] == saved["core"]
    assert sum(t["cropped"] for t in ref["tasks"].values()) > 0


def test_base_eval_checkpoint_core(tmp_path, base_dir):
    from nanochat.checkpoint_manager import save_checkpoint
    from scripts.base_eval import main

    tok = byte_tokenizer()
    tok.save(base_dir / "tokenizer")
    model = small_gpt(tok.get_vocab_size(), seq_len=96)
    save_checkpoint(base_dir / "base_checkpoints" / "t1", 5, model.state_dict(), None,
                    {"model_config": model.config.to_dict()})
    bundle = make_bundle(tmp_path)
    result = main(["--eval", "core", "--eval-bundle", str(bundle), "--device-type", "cpu",
                   "--dump-examples", str(tmp_path / "ex.jsonl")])
    saved = json.loads((base_dir / "base_checkpoints" / "t1" / "base_eval_000005.json").read_text())
    ref = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False)
    assert saved["core"] == pytest.approx(ref["core"]) and saved["step"] == 5 and result["max_seq_len"] == 96
    assert len(open(tmp_path / "ex.jsonl").readlines()) == 42


def test_base_eval_rejects_unknown_parts():
    from scripts.base_eval import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--eval", "core,perplexity"])


def test_base_eval_without_bundle_fails_fast_before_loading(tmp_path, base_dir, monkeypatch, capsys):
    from scripts import base_eval

    monkeypatch.delenv(ce.EVAL_BUNDLE_ENV, raising=False)
    monkeypatch.setattr(ce, "EVAL_BUNDLE_URL", f"http://127.0.0.1:{free_port()}/eval_bundle.zip")
    monkeypatch.setattr(ce.resolve_eval_bundle, "__defaults__", (None, None, True, ce.EVAL_BUNDLE_URL, 2.0))
    with pytest.raises(SystemExit) as exit_info:
        base_eval.main(["--eval", "core", "--device-type", "cpu"])  # no checkpoint either: the bundle is checked first
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--eval-bundle PATH" in err and len(err.strip().splitlines()) == 1


def test_shared_prefix_equals_unbatched(tmp_path):
    """Multiple choice with the context prefilled once into a KV cache == full forwards of every choice."""
    bundle = make_bundle(tmp_path)
    tok = byte_tokenizer()
    model = small_gpt(tok.get_vocab_size(), seq_len=1024, n_layer=2)
    spec = next(s for s in ce.load_task_specs(bundle) if s.task_type == "multiple_choice")
    data = ce.load_task_data(bundle, spec)
    examples = ce.prepare_examples(data, list(range(len(data))), spec, tok, max_seq_len=1024)
    assert all(ce._worth_sharing(ex, 1) for ex in examples)
    ref = ce.run_examples(model, examples, tok.get_bos_token_id(), "cpu", batched=False)
    shared = ce.run_examples(model, examples, tok.get_bos_token_id(), "cpu", share_prefix=True, min_shared_tokens=1)
    assert [(d["pred"], d["correct"]) for d in shared] == [(d["pred"], d["correct"]) for d in ref]
    for a, b in zip(ref, shared):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    # evaluate_core turns it on by itself on CPU for KV-cache models, and CORE does not move
    auto = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False)
    off = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False, share_prefix=False)
    assert auto["share_prefix"] is True and auto["core"] == off["core"]


# ---------------------------------------------------------------------------------------------
# base_eval on CPU: a CPU-sized default, overall progress, finished tasks kept when stopped


def _checkpoint(base_dir, tag="t1", step=5):
    from nanochat.checkpoint_manager import save_checkpoint

    tok = byte_tokenizer()
    tok.save(base_dir / "tokenizer")
    model = small_gpt(tok.get_vocab_size(), seq_len=96)
    save_checkpoint(base_dir / "base_checkpoints" / tag, step, model.state_dict(), None,
                    {"model_config": model.config.to_dict()})
    return model, tok


def test_base_eval_cpu_default_says_what_it_chose(tmp_path, base_dir, monkeypatch, capsys):
    from scripts import base_eval

    model, tok = _checkpoint(base_dir)
    bundle = make_bundle(tmp_path, n=30)
    monkeypatch.setattr(base_eval, "CPU_MAX_PER_TASK", 12)
    result = base_eval.main(["--eval", "core", "--eval-bundle", str(bundle), "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert "on CPU, CORE runs at most 12 examples per task" in out and "--max-per-task -1" in out
    assert result["core_eval"]["max_per_task"] == 12 and all(t["n"] == 12 for t in result["tasks"].values())
    # the overall count: the total announced up front, each task's line says how far the whole run is
    assert "CORE: 3 task(s) to run, 36 examples (12 per task at most)" in out
    assert "[overall 12/36 examples]" in out and "[overall 36/36 examples]" in out
    ref = ce.evaluate_core(model, tok, "cpu", bundle, 12, verbose=False)
    assert result["core"] == pytest.approx(ref["core"])
    # asked for explicitly, every example runs
    everything = base_eval.main(["--eval", "core", "--eval-bundle", str(bundle), "--device-type", "cpu",
                                 "--max-per-task", "-1", "--out", str(tmp_path / "all.json")])
    assert all(t["n"] == 30 for t in everything["tasks"].values())


def test_base_eval_keeps_finished_tasks_and_resumes(tmp_path, base_dir, monkeypatch, capsys):
    from scripts import base_eval

    model, tok = _checkpoint(base_dir)
    bundle = make_bundle(tmp_path)
    flags = ["--eval", "core", "--eval-bundle", str(bundle), "--device-type", "cpu", "--max-per-task", "-1"]
    real = ce.evaluate_task
    calls = []

    def stop_at_second_task(*a, **k):
        calls.append(a[4].label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM, through base_eval's handler) raises
        return real(*a, **k)

    monkeypatch.setattr(ce, "evaluate_task", stop_at_second_task)
    with pytest.raises(SystemExit) as stopped:
        base_eval.main(flags)
    err = capsys.readouterr().err
    partial = base_dir / "base_checkpoints" / "t1" / "base_eval_000005.core_partial.json"
    assert stopped.value.code == 130 and "1 finished CORE task(s) are kept in" in err and str(partial) in err
    assert list(json.loads(partial.read_text())["tasks"]) == ["syn_mc"]

    monkeypatch.setattr(ce, "evaluate_task", real)
    calls.clear()
    monkeypatch.setattr(ce, "evaluate_task", lambda *a, **k: calls.append(a[4].label) or real(*a, **k))
    result = base_eval.main(flags)
    out = capsys.readouterr().out
    assert "resuming CORE: 1 task(s) finished by an earlier run are reused" in out and calls == ["syn_schema", "syn_lm"]
    ref = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False)
    assert result["core"] == pytest.approx(ref["core"]) and set(result["tasks"]) == set(ref["tasks"])
    assert not partial.exists()  # whole results written: nothing left to resume
    # kept tasks of another setting (here: examples per task) are not reused
    base_eval.FinishedTasks(partial, {"model": "other"}).add("syn_mc", {"accuracy": 1.0})
    calls.clear()
    base_eval.main(flags)
    assert calls == ["syn_mc", "syn_schema", "syn_lm"]


@pytest.mark.slow
def test_base_eval_sigterm_keeps_finished_tasks(tmp_path, base_dir):
    """A real SIGTERM to a running `python -m scripts.base_eval`: the exit says where the finished tasks are."""
    import os
    import signal
    import subprocess
    import sys

    _checkpoint(base_dir)
    bundle = make_bundle(tmp_path)
    partial = base_dir / "base_checkpoints" / "t1" / "base_eval_000005.core_partial.json"
    # the second task waits (as a long task would) so that the signal lands mid-evaluation
    code = ("import sys, time; from nanochat import core_eval as ce; real = ce.evaluate_task; n = []\n"
            "def slow(*a, **k):\n"
            "    n.append(1)\n"
            "    if len(n) == 2: time.sleep(120)\n"
            "    return real(*a, **k)\n"
            "ce.evaluate_task = slow\n"
            "from scripts import base_eval\n"
            f"base_eval.main(['--eval', 'core', '--eval-bundle', {str(bundle)!r}, '--device-type', 'cpu'])\n")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, env=dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert partial.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "1 finished CORE task(s) are kept in" in err and "run the same command again to resume" in err
    assert list(json.loads(partial.read_text())["tasks"]) == ["syn_mc"]

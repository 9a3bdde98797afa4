"""The CORE metric (DCLM, arXiv 2406.11794): 22 in-context-learning tasks, one centered score.

Protocol (kept identical to the reference nanochat implementation, see REFERENCE.md section 6):
- each task's rows are shuffled with `random.Random(1337)`; `max_per_task > 0` keeps the first N;
- example `idx` gets `num_fewshot` examples drawn by `random.Random(1234 + idx).sample` from the
  other indices of that (shuffled, truncated) list, joined by a blank line;
- prompts are rendered with jinja2 templates and tokenized with BOS prepended;
- multiple_choice: one sequence per choice, continuation = tokens after the common prefix;
  schema: one sequence per context option, continuation = the common suffix;
  the option with the lowest mean cross-entropy over its continuation wins (first on ties);
- language_modeling: contexts are `trim`med, the continuation starts where the tokens of the
  stripped prompt-without-continuation end; correct iff greedy argmax reproduces every token;
- sequences longer than the model's training context keep their last `max_seq_len` tokens;
- accuracy per task, centered = (acc - rb) / (1 - rb), CORE = mean of centered over tasks.

Speed: the reference runs one example per forward pass (`batched=False` here, kept as the
reference path). The batched path sorts all sequences of a task by length and packs them,
right-padded with BOS, into forwards of at most `batch_tokens` tokens. Causal attention means
right padding never changes the scored positions, so decisions match the unbatched path.
On CPU, where compute rather than launch overhead dominates, multiple-choice examples can also run
their shared context once through a KV cache (`share_prefix`), which saves ~(K-1)/K of the tokens
of a 10-shot K-choice task.
Distributed: rank r evaluates examples r, r+W, ... and the correct counts are all-reduced.

The bundle itself (finding, downloading, parsing task files) is nanochat/eval_bundle.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from jinja2 import Environment

from nanochat import cpu_threads
from nanochat.common import RuntimeContext, context_for
from nanochat.engine import KVCache
from nanochat.eval_bundle import (EVAL_BUNDLE_ENV, EVAL_BUNDLE_URL, SHUFFLE_SEED, TASK_TYPES,  # noqa: F401 (re-exported)
                                  EvalBundleError, TaskDataError, TaskSpec, check_bundle, load_task_data,
                                  load_task_specs, resolve_eval_bundle)

FEWSHOT_SEED = 1234


# ---------------------------------------------------------------------------------------------
# prompts

_MC_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()

_SCHEMA_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()

_LM_TEMPLATE = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()


@lru_cache(maxsize=None)
def _template(source: str):
    return Environment().from_string(source)  # compiled once per process, not once per example


def render_prompts_mc(item: dict, continuation_delimiter: str, fewshot_examples: list[dict] = ()) -> list[str]:
    """One prompt per choice; they share the context, so the continuation is the token suffix after the common prefix."""
    t = _template(_MC_TEMPLATE)
    return [t.render(fewshot_examples=fewshot_examples, continuation_delimiter=continuation_delimiter,
                     item=item, choice=choice) for choice in item["choices"]]


def render_prompts_schema(item: dict, continuation_delimiter: str, fewshot_examples: list[dict] = ()) -> list[str]:
    """One prompt per context option; they share the continuation (the common token suffix)."""
    t = _template(_SCHEMA_TEMPLATE)
    return [t.render(fewshot_examples=fewshot_examples, continuation_delimiter=continuation_delimiter,
                     item=item, context=context) for context in item["context_options"]]


def render_prompts_lm(item: dict, continuation_delimiter: str, fewshot_examples: list[dict] = ()) -> list[str]:
    """[prompt without continuation (stripped), prompt with continuation].

    The strip matters: a trailing space in the prompt-without would be absorbed into the first
    continuation token in the prompt-with, and the former would not be a token prefix of the latter.
    """
    t = _template(_LM_TEMPLATE)
    kw = dict(fewshot_examples=fewshot_examples, continuation_delimiter=continuation_delimiter, item=item)
    return [t.render(include_continuation=False, **kw).strip(), t.render(include_continuation=True, **kw)]


class _AllIndicesBut(Sequence):
    """range(n) without `skip`, lazily: `random.sample` only uses len() and indexing, so sampling from
    this gives exactly what sampling from the materialised list gives, in O(k) instead of O(n)."""

    def __init__(self, n: int, skip: int):
        self.n, self.skip = n, skip

    def __len__(self) -> int:
        return self.n - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if i < self.skip else i + 1


def fewshot_indices(n: int, idx: int, num_fewshot: int) -> list[int]:
    """Indices of the few-shot examples of example `idx` among `n`: `Random(1234 + idx).sample` of the others."""
    if num_fewshot <= 0:
        return []
    if num_fewshot > n - 1:
        raise ValueError(f"{num_fewshot}-shot needs at least {num_fewshot + 1} examples, the task has {n}; "
                         "raise max_per_task")
    return random.Random(FEWSHOT_SEED + idx).sample(_AllIndicesBut(n, idx), num_fewshot)


def render_example(data: list[dict], idx: int, spec: TaskSpec) -> list[str]:
    fewshot = [data[i] for i in fewshot_indices(len(data), idx, spec.num_fewshot)]
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}[spec.task_type]
    return render(data[idx], spec.continuation_delimiter, fewshot)


# ---------------------------------------------------------------------------------------------
# tokens and scored positions


def common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def common_suffix_length(seqs: list[list[int]]) -> int:
    return common_prefix_length([s[::-1] for s in seqs])


@dataclass
class PreparedExample:
    """One example ready for the model. Sequence j scores its tokens [starts[j], ends[j])."""

    idx: int
    task_type: str
    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None = None
    cropped: bool = False


def continuation_spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences to run, starts, ends) from the tokenized prompts of one example."""
    if task_type == "multiple_choice":
        start = common_prefix_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":
        suffix = common_suffix_length(tokens)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    start = len(without)
    if with_[:start] != without:
        # tokenization merged across the boundary (the reference asserts here); score from the
        # first differing token so the example is still judged on its continuation
        start = common_prefix_length([without, with_])
    return [with_], [start], [len(with_)]


def crop_left(tokens: list[int], start: int, end: int, max_seq_len: int | None) -> tuple[list[int], int, int]:
    """Keep the last `max_seq_len` tokens and shift the scored span; position 0 has no predecessor,
    so a continuation longer than the window is scored from position 1."""
    if max_seq_len is None or len(tokens) <= max_seq_len:
        return tokens, start, end
    crop = len(tokens) - max_seq_len
    return tokens[crop:], max(start - crop, 1), end - crop


def prepare_examples(data: list[dict], indices: list[int], spec: TaskSpec, tokenizer,
                     max_seq_len: int | None = None) -> list[PreparedExample]:
    """Render and tokenize the examples `indices` of `data` (one batched encode call for all prompts)."""
    prompts, owners = [], []
    for idx in indices:
        ps = render_example(data, idx, spec)
        prompts.extend(ps)
        owners.append(len(ps))
    all_tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id()) if prompts else []
    out, pos = [], 0
    for idx, count in zip(indices, owners):
        seqs, starts, ends = continuation_spans(spec.task_type, [list(t) for t in all_tokens[pos:pos + count]])
        pos += count
        cropped = False
        if max_seq_len is not None:
            triples = [crop_left(t, s, e, max_seq_len) for t, s, e in zip(seqs, starts, ends)]
            cropped = any(len(t) > max_seq_len for t in seqs)
            seqs, starts, ends = (list(x) for x in zip(*triples))
        out.append(PreparedExample(idx=idx, task_type=spec.task_type, tokens=seqs, starts=starts, ends=ends,
                                   gold=data[idx].get("gold"), cropped=cropped))
    return out


# ---------------------------------------------------------------------------------------------
# forward passes


@torch.no_grad()
def score_rows(model, rows: list[tuple[list[int], int, int]], pad_id: int, device,
               select_positions: bool = True) -> list[tuple[float, bool]]:
    """One forward over right-padded rows; per row (mean loss over its span, argmax reproduces the span).

    Position p predicts token p+1, so span [s, e) is scored from the logits at s-1 .. e-2. Only the
    scored positions go through the softmax (the full (B, T, V) cross-entropy would double memory).
    """
    B, T = len(rows), max(len(t) for t, _, _ in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    row_idx, pos_idx, lengths = [], [], []
    for i, (t, s, e) in enumerate(rows):
        s = max(s, 1)  # position 0 (BOS) has no predecessor to predict it
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        row_idx.extend([i] * (e - s))
        pos_idx.extend(range(s - 1, e - 1))
        lengths.append(e - s)
    ids = ids.to(device)
    r = torch.tensor(row_idx, device=ids.device)
    p = torch.tensor(pos_idx, device=ids.device)
    if select_positions and accepts_positions(model):  # our GPT: the LM head runs only at the scored positions
        logits_NV = model(ids, positions=(r, p)).float()
    else:
        logits_BTV = model(ids)
        r, p = r.to(logits_BTV.device), p.to(logits_BTV.device)
        logits_NV = logits_BTV[r, p].float()
    targets_N = ids.to(logits_NV.device)[r.to(logits_NV.device), p.to(logits_NV.device) + 1]
    losses_N = F.cross_entropy(logits_NV, targets_N, reduction="none")
    hits_N = logits_NV.argmax(dim=-1) == targets_N
    # per-row reductions stay on the device; one transfer at the end (no sync per row on GPU)
    means = torch.stack([loss.mean() for loss in losses_N.split(lengths)]).tolist()
    all_hit = torch.stack([hit.all() for hit in hits_N.split(lengths)]).tolist()
    return list(zip(means, map(bool, all_hit)))


def pack_rows(lengths: list[int], batch_tokens: int, max_rows: int = 512) -> list[list[int]]:
    """Group row indices into forwards: longest first, each forward at most `batch_tokens`
    padded tokens (a row longer than the budget goes alone). Sorting keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for i in order:
        # rows arrive longest first, so the group's padded width is the length of its first row
        if current and ((len(current) + 1) * lengths[current[0]] > batch_tokens or len(current) >= max_rows):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def decide(example: PreparedExample, results: list[tuple[float, bool]]) -> dict:
    """The example's decision from its rows' (mean loss, all-argmax-match)."""
    if example.task_type == "language_modeling":
        return {"idx": example.idx, "correct": results[0][1]}
    scores = [m for m, _ in results]
    finite = [m if math.isfinite(m) else math.inf for m in scores]
    pred = finite.index(min(finite))  # first minimum, as list.index(min(...)) in the reference
    return {"idx": example.idx, "correct": pred == example.gold, "pred": pred, "gold": example.gold,
            "scores": [round(m, 6) for m in scores]}


def accepts_positions(model) -> bool:
    """`model(idx, positions=(rows, cols)) -> (N, V)` logits at chosen positions: declared by the model class
    (`supports_positions`; our GPT has it, Hugging Face wrappers do not)."""
    return bool(getattr(model, "supports_positions", False))


def supports_kv_cache(model) -> bool:
    """`model(idx, kv_cache=cache)` with a `nanochat.engine.KVCache`: declared by the model class."""
    return bool(getattr(model, "supports_kv_cache", False))


def _worth_sharing(ex: PreparedExample, min_shared_tokens: int) -> bool:
    """Multiple choice, uncropped (a cropped window no longer starts at a common prefix), a non-empty
    continuation per choice, and enough repeated context tokens to pay for a second forward."""
    if ex.task_type != "multiple_choice" or ex.cropped or len(ex.tokens) < 2:
        return False
    prefix = ex.starts[0]
    return (all(s == prefix for s in ex.starts) and all(e > prefix for e in ex.ends)
            and prefix * (len(ex.tokens) - 1) >= min_shared_tokens)


@torch.no_grad()
def score_shared_prefix(model, ex: PreparedExample, pad_id: int, device) -> list[tuple[float, bool]]:
    """Multiple choice with the common context run once: prefill it into a KV cache, copy the cache
    for each choice and run only the continuations (right-padded) on top. Same mathematics as the
    full forward of every choice; the floats differ only by kernel order (~1e-6)."""
    prefix = ex.starts[0]
    conts = [t[prefix:] for t in ex.tokens]
    K, Lc = len(conts), max(len(c) for c in conts)
    cache = KVCache.for_model(model, 1, prefix + Lc)
    ctx = torch.tensor([ex.tokens[0][:prefix]], dtype=torch.long, device=device)
    if accepts_positions(model):  # the LM head only at the context's last position
        last = torch.tensor([prefix - 1], device=device)
        last_1V = model(ctx, kv_cache=cache, positions=(torch.zeros_like(last), last)).float()
    else:
        last_1V = model(ctx, kv_cache=cache)[:, -1].float()  # predicts each choice's first token
    cache = cache.expand(K)
    ids = torch.full((K, Lc), pad_id, dtype=torch.long)
    for j, c in enumerate(conts):
        ids[j, :len(c)] = torch.tensor(c, dtype=torch.long)
    ids = ids.to(device)
    logits_KLV = model(ids, kv_cache=cache).float()
    # position i of a continuation is predicted by the logits at i-1 (the context's last for i = 0)
    pred_KLV = torch.cat([last_1V.expand(K, -1).unsqueeze(1), logits_KLV[:, :-1]], dim=1)
    out = []
    for j, c in enumerate(conts):
        logits_NV, targets_N = pred_KLV[j, :len(c)], ids[j, :len(c)]
        loss = F.cross_entropy(logits_NV, targets_N, reduction="none")
        out.append((loss.mean().item(), bool((logits_NV.argmax(-1) == targets_N).all().item())))
    return out


def run_examples(model, examples: list[PreparedExample], pad_id: int, device, batched: bool = True,
                 batch_tokens: int = 8192, share_prefix: bool = False, min_shared_tokens: int = 512,
                 progress=None) -> list[dict]:
    """Decisions for `examples`, in order. `batched=False` is the reference: one forward per example.

    `share_prefix` (models with a KV cache only): multiple-choice examples whose choices repeat at
    least `min_shared_tokens` context tokens run their context once (`score_shared_prefix`); the
    rest go through the batched/unbatched path. It cuts compute ~K-fold on 10-shot K-choice tasks;
    worth it where compute, not launch overhead, dominates (CPU). `progress`: a `nanochat.progress.Progress`
    counting examples (advanced as they are decided).
    """
    tick = progress.update if progress is not None else (lambda n=1: None)
    if share_prefix and supports_kv_cache(model):
        shared = {}
        for k, ex in enumerate(examples):
            if _worth_sharing(ex, min_shared_tokens):
                shared[k] = decide(ex, score_shared_prefix(model, ex, pad_id, device))
                tick()
        if shared:
            rest = [k for k in range(len(examples)) if k not in shared]
            rest_decisions = run_examples(model, [examples[k] for k in rest], pad_id, device, batched, batch_tokens,
                                          progress=progress)
            merged = dict(shared)
            merged.update(zip(rest, rest_decisions))
            return [merged[k] for k in range(len(examples))]
    if not batched:
        # the reference computes the full (T, V) logits of every example, as the original harness does
        out = []
        for ex in examples:
            out.append(decide(ex, score_rows(model, list(zip(ex.tokens, ex.starts, ex.ends)), pad_id, device,
                                             select_positions=False)))
            tick()
        return out
    rows, owner = [], []
    for k, ex in enumerate(examples):
        rows.extend(zip(ex.tokens, ex.starts, ex.ends))
        owner.extend([k] * len(ex.tokens))
    results: list = [None] * len(rows)
    for group in pack_rows([len(t) for t, _, _ in rows], batch_tokens):
        cpu_threads.tick()
        for i, res in zip(group, score_rows(model, [rows[i] for i in group], pad_id, device)):
            results[i] = res
        tick(len(group) * len(examples) / max(1, len(rows)))  # examples' worth of rows scored
    per_example: list[list] = [[] for _ in examples]
    for i, res in enumerate(results):
        per_example[owner[i]].append(res)  # rows were appended example by example, so order holds
    return [decide(ex, res) for ex, res in zip(examples, per_example)]


# ---------------------------------------------------------------------------------------------
# tasks and the CORE aggregate


def evaluate_task(model, tokenizer, data: list[dict], device, spec: TaskSpec, max_seq_len: int | None = None,
                  batched: bool = True, batch_tokens: int = 8192, collect_examples: bool = False,
                  share_prefix: bool = False, ctx: RuntimeContext | None = None,
                  progress_every: float | None = None, progress=None) -> dict:
    """Accuracy of `model` on one task's (already shuffled/truncated) `data`, across all ranks.

    Returns {accuracy, correct, n, examples (rank 0, when collect_examples: every example's decision)}.
    `progress_every`: seconds between rank 0's `label: done/total examples, rate, ETA` lines (None: silent).
    `progress`: a `nanochat.progress.Progress` to advance instead (evaluate_core's overall one; this rank's
    examples are counted, scaled by the world size so that the count reads as all ranks').
    """
    from nanochat.progress import Progress

    ctx = context_for(device, ctx)
    indices = list(range(ctx.rank, len(data), ctx.world_size))
    prepared = prepare_examples(data, indices, spec, tokenizer, max_seq_len)
    bar = (Progress(spec.label, len(prepared), "examples", every=progress_every, enabled=ctx.is_master)
           if progress_every is not None else None)
    if progress is not None:
        bar = _Scaled(progress, len(data) / max(1, len(prepared)))
    decisions = run_examples(model, prepared, tokenizer.get_bos_token_id(), device, batched, batch_tokens,
                             share_prefix=share_prefix, progress=bar)
    correct = float(sum(d["correct"] for d in decisions))
    n_cropped = float(sum(ex.cropped for ex in prepared))
    correct, n_cropped = ctx.all_reduce_sum([correct, n_cropped])
    out = {"accuracy": correct / len(data) if data else float("nan"), "correct": int(correct), "n": len(data),
           "cropped": int(n_cropped)}
    if collect_examples:
        gathered = ctx.all_gather_object(decisions)
        decisions = sorted((d for part in gathered for d in part), key=lambda d: d["idx"])
        out["examples"] = decisions
    return out


class _Scaled:
    """Advances a Progress by `factor` per unit (one rank's examples counted as all ranks')."""

    def __init__(self, progress, factor: float):
        self.progress, self.factor = progress, factor

    def update(self, n: float = 1) -> None:
        self.progress.update(n * self.factor)


def centered_score(accuracy: float, random_baseline_percent: float) -> float:
    rb = 0.01 * random_baseline_percent
    return (accuracy - rb) / (1.0 - rb)


def aggregate_core(tasks: dict[str, dict]) -> float:
    """CORE = mean of the centered scores of the tasks evaluated (NaN when there are none)."""
    centered = [t["centered"] for t in tasks.values()]
    return sum(centered) / len(centered) if centered else float("nan")


def _default_max_seq_len(model) -> int | None:
    for obj in (model, getattr(model, "config", None)):
        for name in ("max_seq_len", "sequence_len"):
            value = getattr(obj, name, None)
            if isinstance(value, int):
                return value
    return None


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task: int = -1, *,
                  max_seq_len: int | None = None, tasks: list[str] | None = None, batched: bool = True,
                  batch_tokens: int = 8192, share_prefix: bool | None = None,
                  dump_examples: str | os.PathLike | None = None,
                  base_dir=None, verbose: bool = True, ctx: RuntimeContext | None = None,
                  progress_every: float = 5.0, should_stop=None, done: dict | None = None,
                  on_task=None) -> dict | None:
    """Evaluate CORE. Returns {core, tasks: {label: {accuracy, centered, n, ...}}, missing, n_tasks,
    n_examples, seconds, examples_per_second}.

    `model(idx) -> logits (B, T, V)`; `tokenizer.encode(list, prepend=id)` and `get_bos_token_id()`.
    `max_seq_len`: the context the model was trained with (default: `model.max_seq_len` or
    `model.config.sequence_len`); longer prompts are cropped from the left. A task whose data file
    is missing is listed in `missing` and CORE is the mean over the tasks present. A task whose data file is
    corrupt (`TaskDataError`: file and line) is listed in `failed` ({label: message}) and the evaluation goes
    on: the tasks scored are kept and reported, CORE is the mean over them (callers should treat a
    non-empty `failed` as a failed evaluation). Rank 0 prints per-task progress every `progress_every` s
    (also when not `verbose`; None: never).
    `dump_examples`: a jsonl path that receives every example's decision (rank 0 writes it).
    `share_prefix`: run each multiple-choice context once through a KV cache (see `run_examples`);
    None = on for CPU devices with a KV-cache model, off elsewhere (GPUs prefer the packed forwards).
    `should_stop`: a callable checked before each task (distributed: every rank calls it equally often);
    when it answers True the evaluation is abandoned and None returned.
    Progress: one line every `progress_every` s over all tasks: `CORE (task k/n label): done/total examples,
    rate, elapsed, ETA`. `done`: {label: result} of tasks finished by an earlier, stopped evaluation with the
    same model and settings; they are reused, not run. `on_task(label, result)`: called (every rank) as each
    task finishes, so a caller can keep finished tasks on disk (scripts/base_eval.py).
    """
    bundle = resolve_eval_bundle(bundle_dir, base_dir=base_dir)
    specs = load_task_specs(bundle)
    if tasks is not None:
        unknown = sorted(set(tasks) - {s.label for s in specs})
        if unknown:
            raise ValueError(f"unknown CORE task(s) {unknown}; known: {[s.label for s in specs]}")
        specs = [s for s in specs if s.label in set(tasks)]
    most_shots = max((s.num_fewshot for s in specs), default=0)
    if 0 < max_per_task <= most_shots:
        raise ValueError(f"max_per_task={max_per_task} is too small: {most_shots}-shot tasks draw their examples "
                         f"from the other rows of the task, so use max_per_task > {most_shots} (or -1 for all)")
    if max_seq_len is None:
        max_seq_len = _default_max_seq_len(model)
    if share_prefix is None:
        share_prefix = batched and torch.device(device).type == "cpu" and supports_kv_cache(model)
    ctx = context_for(device, ctx)
    log = print if (verbose and ctx.is_master) else (lambda *a, **k: None)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    from nanochat.progress import Progress

    results, missing, failed, dump = {}, [], {}, []
    done = dict(done or {})
    t_start = time.time()
    datasets = {}
    for spec in specs:  # all tasks' data first: the overall progress needs the total
        if spec.label in done:
            continue
        try:
            data = load_task_data(bundle, spec, max_per_task)
        except TaskDataError as e:
            failed[spec.label] = str(e)
            log(f"{spec.label:<34} FAILED: {e}", flush=True)
            continue
        if data is None:
            missing.append(spec.label)
            log(f"{spec.label:<34} MISSING: no data file {bundle / 'eval_data' / spec.dataset_uri}", flush=True)
            continue
        datasets[spec.label] = data
    total = sum(len(d) for d in datasets.values())
    reused = [s.label for s in specs if s.label in done]
    log(f"CORE: {len(datasets)} task(s) to run, {total:,} examples"
        + (f" ({max_per_task} per task at most)" if max_per_task > 0 else "")
        + (f"; {len(reused)} finished earlier, reused: {', '.join(reused)}" if reused else ""), flush=True)
    overall = (Progress("CORE", total, "examples", every=progress_every, enabled=ctx.is_master)
               if progress_every is not None else None)
    for k, spec in enumerate(specs):
        if spec.label in done:
            results[spec.label] = done[spec.label]
            continue
        if spec.label not in datasets:
            continue
        if should_stop is not None and should_stop():
            if was_training and hasattr(model, "train"):
                model.train()
            return None
        data = datasets.pop(spec.label)
        if overall is not None:
            overall.what = f"CORE (task {k + 1}/{len(specs)} {spec.label})"
        t0 = time.time()
        res = evaluate_task(model, tokenizer, data, device, spec, max_seq_len=max_seq_len, batched=batched,
                            batch_tokens=batch_tokens, collect_examples=dump_examples is not None,
                            share_prefix=share_prefix, ctx=ctx, progress=overall)
        seconds = time.time() - t0
        centered = centered_score(res["accuracy"], spec.random_baseline)
        results[spec.label] = {"accuracy": res["accuracy"], "centered": centered, "n": res["n"],
                               "correct": res["correct"], "cropped": res["cropped"], "seconds": seconds,
                               "task_type": spec.task_type, "num_fewshot": spec.num_fewshot}
        log(f"{spec.label:<34} {spec.num_fewshot:>2}-shot {spec.task_type:<17} n={res['n']:<6} "
            f"acc={res['accuracy']:.4f} centered={centered:+.4f} ({seconds:.1f}s)"
            + (f"  [overall {int(overall.done):,}/{total:,} examples]" if overall is not None else ""), flush=True)
        if on_task is not None:
            on_task(spec.label, results[spec.label])
        for d in res.get("examples", []):
            dump.append({"task": spec.label, **d})
    seconds = time.time() - t_start
    n_examples = sum(r["n"] for r in results.values())
    core = aggregate_core(results)
    if missing or failed:
        log(f"CORE over {len(results)} of {len(specs)} tasks:" + (f" missing {', '.join(missing)}" if missing else "")
            + (f" failed {', '.join(failed)}" if failed else ""), flush=True)
    if dump_examples is not None and ctx.is_master:
        Path(dump_examples).parent.mkdir(parents=True, exist_ok=True)
        with open(dump_examples, "w", encoding="utf-8") as f:
            for d in dump:
                f.write(json.dumps(d) + "\n")
    if was_training and hasattr(model, "train"):
        model.train()
    return {"core": core, "tasks": results, "missing": missing, "failed": failed, "n_tasks": len(results),
            "n_tasks_total": len(specs), "n_examples": n_examples, "seconds": seconds,
            "examples_per_second": n_examples / seconds if seconds > 0 else float("nan"),
            "max_per_task": max_per_task, "max_seq_len": max_seq_len, "bundle": str(bundle),
            "batched": batched, "share_prefix": share_prefix}

"""Chat evaluation: categorical tasks in batches, generative tasks with the engine, and ChatCORE.

Categorical (ARC-Easy, ARC-Challenge, MMLU): each prompt is rendered for completion (ending with
<|assistant_start|>), a batch of prompts is right-padded and run once, and the prediction is the
letter whose token has the highest logit at the answer position among the question's letters
(a tiny model need not produce the letter first to be scored, as in the reference). Right padding
never changes a causal model's logits at the real positions, so batched decisions equal
one-at-a-time ones (tested).

Generative (GSM8K, HumanEval, the embedded mix): `num_samples` replies per problem sampled with the
engine (temperature 0 = greedy by default; calculator tool use on), all replies of all problems
decoded together in rows of `decode_batch` (continuous batching on engine.BatchDecoder, the decode
loop the chat server shares, each reply with its own seed), each
scored by the task;
pass@k is the unbiased estimator of Chen et al. (2021) from n samples with c correct, and the
accuracy is pass@1.

ChatCORE = mean over the tasks that ran of (accuracy - baseline) / (1 - baseline), baseline 0.25
for the three 4-way multiple-choice tasks and 0 for the generative ones; the result lists which of
the five tasks it covers. Problems are split across ranks (i = rank, rank + W, ...) and the counts
summed.
"""

from __future__ import annotations

import math
import time

import torch

from nanochat.tasks import EVAL_TASKS, TaskDataError

BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CHATCORE_TASKS = tuple(BASELINES)
GENERATIVE_MAX_TOKENS = {"GSM8K": 512, "HumanEval": 512, "EmbeddedChat": 128}


def chatcore(accuracies: dict[str, float]) -> dict:
    """{"chatcore": mean centered accuracy over the ChatCORE tasks present (None if none), "tasks": [...],
    "missing": [...], "centered": {task: value}}."""
    centered = {t: (accuracies[t] - b) / (1 - b) for t, b in BASELINES.items() if t in accuracies}
    return {"chatcore": sum(centered.values()) / len(centered) if centered else None,
            "tasks": list(centered), "missing": [t for t in BASELINES if t not in accuracies], "centered": centered}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _all_reduce_sum(ctx, values: list[float]) -> list[float]:
    return values if ctx is None else ctx.all_reduce_sum(values)


def _rank_indices(n: int, ctx) -> range:
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    return range(rank, n, world)


# ---------------------------------------------------------------------------------------------
# categorical


def letter_ids(tokenizer, letters) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(enc)} tokens in this tokenizer; it must be one")
        ids.append(enc[0])
    return ids


@torch.no_grad()
def categorical_predictions(model, tokenizer, conversations: list[dict]) -> list[int]:
    """Index of the predicted letter for each conversation, from one right-padded forward pass."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    limit = model.config.sequence_len
    prompts = [p[-limit:] for p in prompts]  # a prompt longer than the context keeps its end (the question)
    device = model.get_device()
    T = max(len(p) for p in prompts)
    pad = tokenizer.get_bos_token_id()
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = torch.tensor(p)
    rows = torch.arange(len(prompts), device=device)
    cols = torch.tensor([len(p) - 1 for p in prompts], device=device)
    logits = model(idx.to(device), positions=(rows, cols))  # (N, V) at each answer position
    preds = []
    for i, conv in enumerate(conversations):
        ids = torch.tensor(letter_ids(tokenizer, conv["letters"]), device=device)
        preds.append(int(logits[i, ids].argmax()))
    return preds


def run_categorical(task, model, tokenizer, ctx=None, batch_size: int = 8, max_problems: int = -1) -> dict:
    n = len(task) if max_problems <= 0 else min(len(task), max_problems)
    indices = list(_rank_indices(n, ctx))
    # batches of similar prompt lengths: less right padding (the decisions do not depend on the grouping)
    indices.sort(key=lambda i: len(tokenizer.render_for_completion(task[i])))
    correct = 0
    model.eval()
    for start in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[start:start + batch_size]]
        for conv, pred in zip(convs, categorical_predictions(model, tokenizer, convs)):
            correct += conv["letters"][pred] == conv["messages"][-1]["content"]
    correct, total = _all_reduce_sum(ctx, [correct, len(indices)])
    return {"accuracy": correct / total if total else 0.0, "n": int(total), "correct": int(correct)}


# ---------------------------------------------------------------------------------------------
# generative


def run_generative(task, model, tokenizer, ctx=None, num_samples: int = 1, max_new_tokens: int = 256,
                   temperature: float = 0.0, top_k: int | None = 50, max_problems: int = -1, batch_size: int = 32,
                   seed: int = 42, examples: list | None = None) -> dict:
    """Every (problem, sample) is one reply; `batch_size` replies are decoded together (Engine.generate_many),
    each with its own seed, so the scores do not depend on the batch size."""
    from nanochat.engine import Engine, rows_for_memory
    from nanochat.tasks.embedded import KINDS  # problems with a "kind" (the embedded mix) are also scored per kind

    engine = Engine(model, tokenizer)
    n = len(task) if max_problems <= 0 else min(len(task), max_problems)
    indices = list(_rank_indices(n, ctx))
    model.eval()
    limit = model.config.sequence_len
    convs = {i: task[i] for i in indices}
    prompts = {i: tokenizer.render_for_completion(convs[i])[-(limit - 1):] for i in indices}
    jobs = [(i, j) for i in indices for j in range(num_samples)]
    caps = [min(max_new_tokens, limit - len(prompts[i])) for i, _ in jobs]
    longest = max((len(prompts[i]) + c for (i, _), c in zip(jobs, caps)), default=1)
    rows = rows_for_memory(model, longest, batch_size)
    replies: dict[int, list[str | None]] = {i: [None] * num_samples for i in indices}
    for k, toks, _ in engine.generate_many([prompts[i] for i, _ in jobs], max_tokens=caps, temperature=temperature,
                                           top_k=top_k, seeds=[seed + 1000 * i + j for i, j in jobs],
                                           batch_size=rows):
        i, j = jobs[k]
        replies[i][j] = tokenizer.decode(toks)
    ks = sorted({1, num_samples})
    sums = [0.0] * len(ks)
    by_kind = [0.0] * (2 * len(KINDS))  # (pass@1 sum, count) per kind
    for i in indices:
        conv = convs[i]
        c = sum(bool(task.evaluate(conv, r)) for r in replies[i])
        for j, k in enumerate(ks):
            sums[j] += pass_at_k(num_samples, c, k)
        if conv.get("kind") in KINDS:
            kind = KINDS.index(conv["kind"])
            by_kind[2 * kind] += c / num_samples
            by_kind[2 * kind + 1] += 1
        if examples is not None and len(examples) < 2:
            user = [m["content"] for m in conv["messages"] if m.get("role") == "user"]  # the question replied to
            examples.append({"prompt": user[-1] if user else conv["messages"][0]["content"], "reply": replies[i][0],
                             "correct": c > 0, "earlier_turns": max(0, len(user) - 1)})
    totals = _all_reduce_sum(ctx, sums + by_kind + [len(indices)])
    total = totals[-1]
    out = {f"pass@{k}": (totals[j] / total if total else 0.0) for j, k in enumerate(ks)}
    kinds = totals[len(ks):-1]
    if any(kinds[1::2]):
        out["by_kind"] = {name: kinds[2 * i] / kinds[2 * i + 1] for i, name in enumerate(KINDS) if kinds[2 * i + 1]}
    out.update(accuracy=out["pass@1"], n=int(total), num_samples=num_samples, decode_rows=rows)
    return out


# ---------------------------------------------------------------------------------------------
# a whole evaluation


def run_chat_eval(model, tokenizer, ctx=None, tasks: list[str] | None = None, task_data=None, max_problems: int = -1,
                  batch_size: int = 8, num_samples: int = 1, max_new_tokens: int | None = None,
                  temperature: float = 0.0, top_k: int | None = 50, quiet: bool = False,
                  decode_batch: int = 32) -> dict:
    """Evaluate `tasks` (names of nanochat.tasks.EVAL_TASKS; default the five ChatCORE tasks). A task whose
    data cannot be loaded is reported under "missing" with the reason; ChatCORE covers the tasks that ran."""
    say = (lambda *a: None) if quiet else (ctx.print0 if ctx is not None else print)
    names = list(tasks) if tasks else list(CHATCORE_TASKS)
    unknown = [t for t in names if t not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; known: {', '.join(EVAL_TASKS)}")
    results, missing, samples = {}, {}, {}
    for name in names:
        try:
            task = EVAL_TASKS[name](task_data)
        except TaskDataError as e:
            missing[name] = str(e)
            say(f"{name}: skipped ({e})")
            continue
        t0 = time.time()
        if task.eval_type == "categorical":
            res = run_categorical(task, model, tokenizer, ctx, batch_size, max_problems)
        else:
            examples: list = []
            res = run_generative(task, model, tokenizer, ctx, num_samples,
                                 max_new_tokens or GENERATIVE_MAX_TOKENS.get(name, 256), temperature, top_k,
                                 max_problems, decode_batch, examples=examples)
            samples[name] = examples
        res["seconds"] = time.time() - t0
        res["type"] = task.eval_type
        results[name] = res
        say(f"{name}: accuracy {res['accuracy']:.4f} over {res['n']} problems ({res['seconds']:.1f}s)")
    score = chatcore({k: v["accuracy"] for k, v in results.items()})
    for name, c in score["centered"].items():
        results[name]["baseline"], results[name]["centered"] = BASELINES[name], c
    if score["chatcore"] is not None:
        say(f"ChatCORE {score['chatcore']:.4f} over {', '.join(score['tasks'])}"
            + (f" (not run: {', '.join(score['missing'])})" if score["missing"] else ""))
    model.train()
    return {"tasks": results, "chatcore": score["chatcore"], "chatcore_tasks": score["tasks"],
            "chatcore_missing": score["missing"], "missing": missing, "samples": samples}


def to_markdown(result: dict, title: str = "Chat evaluation") -> str:
    lines = [f"## {title}", "", "| task | type | accuracy | centered | problems |", "|---|---|---|---|---|"]
    for name, r in result["tasks"].items():
        centered = f"{r['centered']:.4f}" if "centered" in r else "-"
        lines.append(f"| {name} | {r['type']} | {r['accuracy']:.4f} | {centered} | {r['n']} |")
        for kind, acc in (r.get("by_kind") or {}).items():
            lines.append(f"| {name}: {kind} | | {acc:.4f} | - | |")
    for name, why in result["missing"].items():
        lines.append(f"| {name} | - | not run | - | {why.split(';')[0]} |")
    if result["chatcore"] is not None:
        covered = ", ".join(result["chatcore_tasks"])
        lines += ["", f"**ChatCORE {result['chatcore']:.4f}** over {covered}"
                  + (f" (not run: {', '.join(result['chatcore_missing'])})" if result["chatcore_missing"] else "")]
    return "\n".join(lines) + "\n"

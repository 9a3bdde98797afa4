"""Fine-tuning batches: render conversations with their loss masks and best-fit pack them into rows.

Stream. Rank r of W takes conversations r, r+W, r+2W, ... of the task (a TaskMixture is already a
fixed-seed shuffle), pass after pass (`loop=True`, training) or once (`loop=False`, validation).

Rendering. `tokenizer.render_conversation` gives the ids and the 0/1 mask of assistant tokens; the
targets are the next ids where the next token's mask is 1, else -1 (ignored by the loss).

Packing (as the pretraining loader, REFERENCE section 4, but conversations are never split across
rows: a conversation is one document the model must see whole). A buffer holds `buffer_size`
rendered conversations; each row of T+1 tokens takes the largest buffered conversation that still
fits (ties: the earliest read) until none does, and the rest of the row is padding (BOS inputs,
-1 targets; counted in `stats()["pad_tokens"]`). A conversation longer than a row is, per
`overflow`, cropped to the row ("crop") or dropped ("skip"); one whose kept part trains no token
(a crop inside the first user message) is always dropped. So every row trains at least one token,
no batch is all padding, and the loss is finite at any `seq_len` -- the reference's loader keeps
such conversations waiting forever and its loss goes NaN at short rows (its issue #590). Every
conversation of a pass is counted exactly once as used, cropped or skipped.

Exact resume. Packing is deterministic given the stream, so the state is the stream position, the
indices of the buffered conversations (re-rendered on load) and the counters: a small JSON dict,
always describing the position after the last batch returned.
"""

from __future__ import annotations

import torch

STATE_VERSION = 1


class ChatPackingLoader:
    def __init__(self, tokenizer, task, batch_size: int, seq_len: int, device="cpu", rank: int = 0,
                 world_size: int = 1, buffer_size: int = 64, overflow: str = "crop", loop: bool = True):
        if overflow not in ("crop", "skip"):
            raise ValueError(f"overflow must be 'crop' or 'skip', got {overflow!r}")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        self.tokenizer, self.task = tokenizer, task
        self.B, self.T, self.buffer_size = batch_size, seq_len, max(1, buffer_size)
        self.device, self.rank, self.W = torch.device(device), rank, world_size
        self.overflow, self.loop = overflow, loop
        self.bos = tokenizer.get_bos_token_id()
        self.stream = range(rank, len(task), world_size)  # this rank's conversation indices
        if len(self.stream) == 0:
            raise ValueError(f"{task!r} has {len(task)} conversations: too few for {world_size} ranks")
        self.epoch, self.pos = 0, 0  # next conversation: self.stream[self.pos] of pass self.epoch
        self.buffer: list[tuple[int, list[int], list[int]]] = []  # (task index, ids, mask) in read order
        self.counts = dict(used=0, cropped=0, skipped=0, rows=0, tokens=0, pad_tokens=0, target_tokens=0)
        self.finished = False

    # --- rendering --------------------------------------------------------------------------

    def _render(self, index: int) -> tuple[list[int], list[int]] | None:
        """(ids, mask) fitted to a row, or None when dropped (the counters are updated here)."""
        ids, mask = self.tokenizer.render_conversation(self.task[index], max_tokens=1 << 62)
        cropped = len(ids) > self.T + 1
        if cropped:
            if self.overflow == "skip":
                self.counts["skipped"] += 1
                return None
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
        if not any(mask[1:]):  # nothing to learn from what is kept
            self.counts["skipped"] += 1
            return None
        self.counts["cropped" if cropped else "used"] += 1
        return ids, mask

    def _refill(self) -> None:
        while len(self.buffer) < self.buffer_size and not self.finished:
            if self.pos == len(self.stream):
                if not self.loop:
                    self.finished = True
                    break
                self.epoch, self.pos = self.epoch + 1, 0
            index = self.stream[self.pos]
            self.pos += 1
            rendered = self._render(index)
            if rendered is not None:
                self.buffer.append((index, *rendered))

    # --- batches ----------------------------------------------------------------------------

    def _row(self) -> tuple[list[int], list[int]] | None:
        ids: list[int] = []
        mask: list[int] = []
        while True:
            self._refill()
            room = self.T + 1 - len(ids)
            best = -1
            for i, (_, conv_ids, _) in enumerate(self.buffer):  # largest that fits; earliest on ties
                if len(conv_ids) <= room and (best < 0 or len(conv_ids) > len(self.buffer[best][1])):
                    best = i
            if best < 0:
                break
            _, conv_ids, conv_mask = self.buffer.pop(best)
            ids += conv_ids
            mask += conv_mask
        if not ids:
            return None  # stream over (loop=False)
        pad = self.T + 1 - len(ids)
        self.counts["pad_tokens"] += pad
        return ids + [self.bos] * pad, mask + [0] * pad

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.B):
            row = self._row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (rows, T+1)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        inputs = ids[:, :-1]
        targets = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
        self.counts["rows"] += len(rows)
        self.counts["tokens"] += inputs.numel()
        self.counts["target_tokens"] += int(mask[:, 1:].sum())
        if self.device.type == "cuda":
            return (inputs.pin_memory().to(self.device, non_blocking=True),
                    targets.pin_memory().to(self.device, non_blocking=True))
        return inputs.to(self.device), targets.to(self.device)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    # --- progress, statistics, state ----------------------------------------------------------

    def progress(self) -> float:
        """Passes over this rank's conversations consumed into batches (1.0 = one epoch)."""
        return (self.epoch * len(self.stream) + self.pos - len(self.buffer)) / len(self.stream)

    def stats(self) -> dict:
        c = dict(self.counts)
        c["conversations"] = c["used"] + c["cropped"] + c["skipped"]
        c["pad_fraction"] = c["pad_tokens"] / max(1, c["rows"] * (self.T + 1))
        return c

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "chat", "epoch": self.epoch, "pos": self.pos,
                "buffer": [i for i, _, _ in self.buffer], "counts": dict(self.counts), "finished": self.finished,
                "rank": self.rank, "world_size": self.W, "num_conversations": len(self.task)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "chat" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a chat loader state (version {STATE_VERSION}): {str(state)[:80]}")
        if (state["rank"], state["world_size"], state["num_conversations"]) != (self.rank, self.W, len(self.task)):
            raise ValueError(f"loader state of rank {state['rank']}/{state['world_size']} over "
                             f"{state['num_conversations']} conversations does not fit rank {self.rank}/{self.W} "
                             f"over {len(self.task)}: resume with the same ranks and task mix")
        counts = dict(state["counts"])
        self.epoch, self.pos, self.finished = state["epoch"], state["pos"], state["finished"]
        self.buffer = []
        for index in state["buffer"]:
            ids, mask = self.tokenizer.render_conversation(self.task[index], max_tokens=self.T + 1)
            self.buffer.append((index, ids, mask))
        self.counts = counts

    def close(self) -> None:
        pass

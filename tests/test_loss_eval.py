"""Bits per byte against a hand computation (plain Python log-softmax over a fixed logit table)."""

import math

import pytest
import torch
import torch.nn as nn

from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb, evaluate_loss_and_bpb, per_token_loss


class TableModel(nn.Module):
    """logits[b, t] = table[idx[b, t]] (no loss_reduction support: exercises the logits path)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):
        return self.table[idx]


def hand_bpb(table, batches, token_bytes):
    nats, nbytes = 0.0, 0
    for x, y in batches:
        for xr, yr in zip(x.tolist(), y.tolist()):
            for a, b in zip(xr, yr):
                if b < 0 or token_bytes[b] == 0:
                    continue
                row = table[a].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                nats += log_z - row[b]
                nbytes += int(token_bytes[b])
    return nats / (math.log(2) * nbytes)


def _batches(V, n=3, B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, V, (B, T + 1), generator=g)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[0, 2] = -1  # an ignored target
        out.append((x, y))
    return out


def test_bpb_matches_hand_computation():
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(3)) * 1.5
    token_bytes = torch.tensor([1, 2, 3, 0, 1, 4, 0, 2])  # ids 3 and 6 are "special": no bytes
    batches = _batches(V)
    got = evaluate_bpb(TableModel(table), batches, len(batches), token_bytes)
    assert got == pytest.approx(hand_bpb(table, batches, token_bytes), rel=1e-6)


def test_val_loss_is_mean_nats_over_all_targets_like_the_training_loss():
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5)) * 1.5
    token_bytes = torch.tensor([1, 2, 3, 0, 1, 4, 0, 2])
    batches = _batches(V)
    out = evaluate_loss_and_bpb(TableModel(table), batches, len(batches), token_bytes)
    # the training loss: cross-entropy averaged over every target except -1, special ones included
    train_style = torch.stack([nn.functional.cross_entropy(table[x].view(-1, V), y.view(-1), ignore_index=-1,
                                                           reduction="sum") for x, y in batches]).sum()
    n = sum(int((y >= 0).sum()) for _, y in batches)
    assert out["tokens"] == n == 3 * 2 * 7 - 3
    assert out["loss"] == pytest.approx(train_style.item() / n, rel=1e-6)
    assert out["bpb"] == pytest.approx(hand_bpb(table, batches, token_bytes), rel=1e-6)
    assert out["bytes"] == sum(int(token_bytes[y[y >= 0]].sum()) for _, y in batches)


def test_special_and_ignored_targets_change_nothing():
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4))
    token_bytes = torch.tensor([1, 2, 3, 0, 1, 4, 0, 2])
    x = torch.tensor([[0, 1, 2, 4]])
    y = torch.tensor([[1, 2, 4, 5]])
    base = evaluate_bpb(TableModel(table), [(x, y)], 1, token_bytes)
    x2 = torch.cat([x, torch.tensor([[7, 1]])], 1)
    y2 = torch.cat([y, torch.tensor([[3, -1]])], 1)  # a special target and an ignored one appended
    assert evaluate_bpb(TableModel(table), [(x2, y2)], 1, token_bytes) == pytest.approx(base, rel=1e-6)


def test_gpt_loss_path_equals_logits_path():
    """Our GPT's per-token loss (`loss_reduction="none"`) and cross-entropy from its logits agree."""
    torch.manual_seed(0)
    V = 40
    model = GPT(GPTConfig(sequence_len=16, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.eval()

    class LogitsOnly(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx):
            return self.m(idx)

    token_bytes = torch.randint(1, 5, (V,))
    token_bytes[0] = 0
    batches = _batches(V, T=12)
    a = evaluate_bpb(model, batches, len(batches), token_bytes)
    b = evaluate_bpb(LogitsOnly(model), batches, len(batches), token_bytes)
    assert a == pytest.approx(b, rel=1e-5)
    x, y = batches[0]
    assert torch.allclose(per_token_loss(model, x, y), per_token_loss(LogitsOnly(model), x, y), atol=1e-5)


def test_bpb_bad_inputs():
    table = torch.zeros(4, 4)
    tb = torch.tensor([1, 1, 0, 1])
    x = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="steps"):
        evaluate_bpb(TableModel(table), [(x, x)], 0, tb)
    with pytest.raises(ValueError, match="ran out after 1 of 2"):
        evaluate_bpb(TableModel(table), [(x, x)], 2, tb)
    with pytest.raises(ValueError, match="no bytes"):
        evaluate_bpb(TableModel(table), [(x, torch.tensor([[2, -1]]))], 1, tb)
    # uniform logits over 4 tokens of 1 byte each: exactly 2 bits per byte
    assert evaluate_bpb(TableModel(table), [(x, x)], 1, tb) == pytest.approx(2.0)

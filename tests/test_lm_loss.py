"""The chunked LM-head loss against the plain composition it replaces: linear, soft-cap, cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig
from nanochat.lm_loss import linear_softcap_cross_entropy


def reference(x, w, targets, vocab_size, cap, reduction):
    logits = F.linear(x, w)[..., :vocab_size].float()
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=-1,
                           reduction=reduction)


def grads(fn, x, w, upstream=1.0):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w)
    (loss * upstream).backward()
    return loss.detach(), x.grad, w.grad


def make(n=37, c=16, v_pad=128, seed=0, ignore_every=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype)
    w = torch.randn(v_pad, c, generator=g, dtype=dtype) * 2.0  # large logits: the soft-cap matters
    t = torch.randint(0, 100, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -1
    return x, w, t


@pytest.mark.parametrize("cap", [15.0, 0.0, 100.0])  # 100: the max-shifted branch (cap + log V too large)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 512])
def test_matches_plain_composition(cap, reduction, chunk_rows):
    x, w, t = make()
    V = 100  # head has 128 (padded) rows; only the first 100 are real tokens
    ref = grads(lambda a, b: reference(a, b, t, V, cap, reduction), x, w, upstream=0.7)
    out = grads(lambda a, b: linear_softcap_cross_entropy(a, b, t, vocab_size=V, softcap=cap, reduction=reduction,
                                                          chunk_rows=chunk_rows), x, w, upstream=0.7)
    # both sides compute fp32 logits; the fused one sums in a different order
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[1:], ref[1:]):  # fp32 noise is relative to the gradient's scale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert out[2][V:].abs().max() == 0  # padded rows never receive gradient


def test_batched_input_and_one_sided_grads():
    x, w, t = make(n=24)
    x3, t3 = x.view(4, 6, -1), t.view(4, 6)
    loss = linear_softcap_cross_entropy(x3, w, t3, vocab_size=100, softcap=15.0)
    torch.testing.assert_close(loss, reference(x, w, t, 100, 15.0, "mean"), rtol=1e-5, atol=1e-6)
    # gradient wanted for the weight only (frozen trunk) and for the input only (frozen head)
    wg = w.clone().requires_grad_()
    linear_softcap_cross_entropy(x3, wg, t3, vocab_size=100, softcap=15.0).backward()
    xg = x3.clone().requires_grad_()
    linear_softcap_cross_entropy(xg, w, t3, vocab_size=100, softcap=15.0).backward()
    _, rx, rw = grads(lambda a, b: reference(a, b, t, 100, 15.0, "mean"), x, w)
    torch.testing.assert_close(wg.grad, rw, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(xg.grad.view(24, -1), rx, rtol=1e-4, atol=1e-7)


def test_all_targets_ignored_gives_zero_loss_and_zero_grads():
    x, w, _ = make(n=8)
    t = torch.full((8,), -1)
    loss, gx, gw = grads(lambda a, b: linear_softcap_cross_entropy(a, b, t, vocab_size=100, softcap=15.0), x, w)
    assert loss.item() == 0.0 and gx.abs().max() == 0 and gw.abs().max() == 0


@pytest.mark.parametrize("chunk_rows", [5, 512])  # several chunks: the weight gradient sums them in fp32
def test_low_precision_inputs_follow_fp32_math(chunk_rows):
    x, w, t = make(n=16, dtype=torch.float32)
    ref = grads(lambda a, b: reference(a.bfloat16(), b.bfloat16(), t, 100, 15.0, "mean"), x, w)
    out = grads(lambda a, b: linear_softcap_cross_entropy(a.bfloat16(), b, t, vocab_size=100, softcap=15.0,
                                                          chunk_rows=chunk_rows), x, w)
    torch.testing.assert_close(out[0], ref[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[1], ref[1], rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(out[2], ref[2], rtol=5e-2, atol=5e-3)
    assert out[2].dtype == torch.float32  # gradient lands in the master weight's dtype


def test_bad_arguments_are_refused():
    x, w, t = make(n=4)
    with pytest.raises(ValueError, match="reduction"):
        linear_softcap_cross_entropy(x, w, t, reduction="none")
    with pytest.raises(ValueError, match="vocab_size"):
        linear_softcap_cross_entropy(x, w, t, vocab_size=129)
    with pytest.raises(ValueError, match="targets"):
        linear_softcap_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_softcap_cross_entropy(x, w, t, chunk_rows=0)


def test_gpt_fused_and_plain_training_losses_agree():
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=200, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)  # away from the near-zero init, so the cap bites
    idx = torch.randint(0, 200, (3, 32))
    tgt = torch.randint(0, 200, (3, 32))
    tgt[0, :5] = -1
    results = []
    for fused in (False, True):
        model.fused_loss, model.fused_loss_chunk_rows = fused, 10
        model.zero_grad(set_to_none=True)
        loss = model(idx, tgt)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-7, msg=name)
    # evaluation paths are untouched: no-grad and per-token losses use the plain head
    with torch.no_grad():
        model.fused_loss = True
        torch.testing.assert_close(model(idx, tgt), l0, rtol=1e-6, atol=1e-6)
    assert model(idx, tgt, loss_reduction="none").shape == (3, 32)


def test_reused_work_buffers_carry_nothing_between_calls():
    """CPU calls share per-thread work buffers: a smaller call after a larger one (stale data in the tail of
    the buffers), in both dtypes, still matches the plain composition, and the buffers are not regrown."""
    from nanochat import lm_loss

    for dtype in (torch.float32, torch.bfloat16):  # fill every buffer with a larger call's data
        big = make(n=300, c=16, v_pad=128, seed=1, dtype=dtype)
        linear_softcap_cross_entropy(big[0].requires_grad_(), big[1], big[2], vocab_size=100, softcap=15.0)
    held = {k: v.data_ptr() for k, v in lm_loss._BUFFERS.tensors.items()}
    for dtype in (torch.float32, torch.bfloat16):
        x, w, t = make(n=21, c=16, v_pad=128, seed=2, dtype=dtype)
        ref = grads(lambda a, b: reference(a, b, t, 100, 15.0, "mean"), x.float(), w.float())
        out = grads(lambda a, b: linear_softcap_cross_entropy(a, b, t, vocab_size=100, softcap=15.0), x, w)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0].float(), ref[0], **tol)
        torch.testing.assert_close(out[1].float(), ref[1], **tol)
    assert all(lm_loss._BUFFERS.tensors[k].data_ptr() == p for k, p in held.items())


def test_auto_chunks_the_loss_wherever_the_head_runs_eagerly(monkeypatch):
    """fused_loss None (--fused-loss auto): the chunked loss on CPU always, and on any other device (meta
    stands in for CUDA) whenever the head runs outside a compiled graph (--no-compile, --compile-scope blocks,
    where the plain head's fp32 logits OOM at depth 20); the plain head only inside a whole-model compile."""
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    cpu, gpu_like = torch.empty(2, 16), torch.empty(2, 16, device="meta")
    assert model.fused_loss is None
    assert model._use_fused_loss(cpu) and model._use_fused_loss(gpu_like)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert model._use_fused_loss(cpu) and not model._use_fused_loss(gpu_like)
    model.fused_loss = True  # an explicit choice wins either way
    assert model._use_fused_loss(gpu_like)
    model.fused_loss = False
    assert not model._use_fused_loss(cpu)

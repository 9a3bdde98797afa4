"""The LM head, soft-cap and cross-entropy as one chunked pass that never holds the full logits.

The plain path materialises `(N, V)` fp32 logits, then runs soft-cap, log-softmax and their backward
as separate passes over that tensor: at N = 2,048 tokens and V = 32,768 that is eight or so trips
through 268 MB of memory per step, and on a CPU those passes cost as much as the head's matmuls.

`linear_softcap_cross_entropy` instead walks the rows in chunks. For each chunk it computes the
logits, the loss and, straight away, the gradient of the loss with respect to those logits (known in
closed form: `softmax - onehot`, times the soft-cap's derivative `1 - tanh^2`), and pushes that
through the head's two backward matmuls. Only the `(N, C)` input gradient and the `(V, C)` weight
gradient are kept; `backward` scales them by the incoming gradient. Memory drops from O(N V) to
O(chunk V), the elementwise passes are fewer (see `_chunk_loss_and_grad`) and run in two reused
buffers. At depth 4 with a 32K vocabulary on a 2-core CPU the head's forward+backward goes from
2.9 s to 1.8 s per 2,048-token step (benchmarks/results/train.md).

Math is that of `F.cross_entropy(cap * tanh(x @ W[:V].T / cap), targets, ignore_index=-1)` with
reduction "mean" (over non-ignored targets) or "sum"; `tests/test_lm_loss.py` checks loss and both
gradients against that composition.
"""

from __future__ import annotations

import math
import threading

import torch

IGNORE_INDEX = -1
_BUFFERS = threading.local()  # per thread: the chunk work buffers, kept from one call to the next


def _work_buffers(n: int, low_dtype: torch.dtype | None, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Two fp32 buffers of >= n elements (and one of `low_dtype`), reused across calls on CPU.

    At 32K vocab and 512-row chunks they are 64 MB each: above glibc's mmap threshold, so a fresh
    allocation per step is a fresh mapping whose every page faults on first touch. Kept, the loss's
    forward+backward at 2,048 x 32K takes 336 instead of 373 ms in bf16 on the 2-core Xeon of
    benchmarks/results/ (benchmarks/bench_cpu_memory.py). Accelerators have caching allocators and get
    fresh ones."""
    kinds = (torch.float32, torch.float32) + ((low_dtype,) if low_dtype is not None else ())
    if device.type != "cpu":
        return tuple(torch.empty(n, dtype=k, device=device) for k in kinds)
    cache = getattr(_BUFFERS, "tensors", None)
    if cache is None:
        cache = _BUFFERS.tensors = {}
    out = []
    for i, k in enumerate(kinds):
        buf = cache.get((i, k))
        if buf is None or buf.numel() < n:
            buf = cache[(i, k)] = torch.empty(n, dtype=k)
        out.append(buf)
    return tuple(out)


def _chunk_loss_and_grad(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, cap: float,
                         work: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x (c, C) against head rows w (V, C). Returns the per-row loss (c,), an fp32 matrix G (V, c)
    and a per-row factor f (c,) such that d loss_r / d logits[:, r] = G[:, r] * f_r.

    The logits are laid out vocab-major, (V, c), because on CPU BLAS `w @ x.T` and the two backward
    products that consume a (V, c) operand run 10-20% faster than their (c, V) counterparts at these
    shapes (K = C is small). Per-row factors are left for the caller to apply to the small (c, C)
    operands of those products instead of making one more pass over the large matrix.

    Soft-cap through the sigmoid: with s = sigmoid(2 z / cap), cap * tanh(z / cap) = cap * (2 s - 1) and
    its derivative 1 - tanh^2 = 4 s (1 - s). The constant -cap cancels in the softmax, so the
    unnormalised probabilities are exp(2 cap s), which cannot overflow fp32 for sane caps, and no
    tanh (5x the cost of a multiply on CPU, sigmoid is 2.5x) is ever evaluated.

    `work` is two flat fp32 buffers of at least V * c elements reused across chunks and calls
    (`_work_buffers`), and for low-precision x a third one of x's dtype that receives the product
    before it is widened to fp32."""
    V, c = w.size(0), x.size(0)
    z = work[0][:V * c].view(V, c)
    if cap:
        x = x * (2.0 / cap)  # folds the 2 / cap into the (c, C) operand: z below is 2 z / cap
    if x.dtype == torch.float32:
        torch.mm(w, x.t(), out=z)
    else:  # bf16 product (the fast units), everything after it in fp32
        z.copy_(torch.mm(w, x.t(), out=work[2][:V * c].view(V, c)) if len(work) > 2 else w @ x.t())
    valid = targets != IGNORE_INDEX
    tgt = torch.where(valid, targets, 0).unsqueeze(0)  # (1, c)
    if cap:
        s = z.sigmoid_()
        logits = torch.mul(s, 2.0 * cap, out=work[1][:V * c].view(V, c))  # logit + cap
        target_logit = logits.gather(0, tgt).squeeze(0)
        shift = logits.amax(dim=0) if 2.0 * cap + math.log(V) >= 80.0 else None  # else exp() stays < 1e35
    else:
        logits = z
        target_logit = logits.gather(0, tgt).squeeze(0)
        shift = logits.amax(dim=0)
    e = (logits.sub_(shift) if shift is not None else logits).exp_()  # unnormalised softmax, in place
    sumexp = e.sum(dim=0)
    lse = sumexp.log() if shift is None else sumexp.log() + shift
    loss = torch.where(valid, lse - target_logit, 0.0)
    # softmax - onehot = (e - onehot * sumexp) / sumexp; the chain rule through the cap multiplies
    # elementwise by d = 4 s (1 - s), and the / sumexp (and the 4) go into the per-row factor
    if cap:
        d = s.addcmul_(s, s, value=-1.0)  # s (1 - s), in place
        e.mul_(d)
        e.scatter_add_(0, tgt, (-sumexp * d.gather(0, tgt).squeeze(0)).unsqueeze(0))
        factor = 4.0 / sumexp
    else:
        e.scatter_add_(0, tgt, -sumexp.unsqueeze(0))
        factor = 1.0 / sumexp
    return loss, e, factor


class _LinearSoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, cap, reduction, chunk_rows):
        n, c = x.shape
        w = weight[:vocab_size].to(x.dtype)  # (V, C) view (or a cast copy) of the unpadded head
        valid = targets != IGNORE_INDEX
        if reduction == "mean":  # a tensor, not a Python number: no host sync on an accelerator
            scale = 1.0 / valid.sum().clamp(min=1).to(torch.float32)  # all ignored: 0 loss, 0 grads
        else:
            scale = torch.ones((), dtype=torch.float32, device=x.device)
        row_scale = valid.to(torch.float32) * scale  # d total / d loss_r
        grad_x = torch.empty(n, c, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)  # sum of per-row losses
        rows = min(chunk_rows, n)
        low = x.dtype != torch.float32
        work = _work_buffers(vocab_size * rows, x.dtype if low else None, x.device)
        for lo in range(0, n, chunk_rows):
            hi = min(lo + chunk_rows, n)
            xs = x[lo:hi]
            loss, g, factor = _chunk_loss_and_grad(xs, w, targets[lo:hi], cap, work)  # g: (V, c) fp32
            total += loss.sum()
            f = (factor * row_scale[lo:hi]).unsqueeze(1)  # (c, 1): d total / d logits[:, r] = g[:, r] * f_r
            if low:
                # low precision (bf16 on GPUs and AMX CPUs): g rounded once into x's dtype and both backward
                # products in it; the per-row factors stay fp32 and the weight gradient sums over chunks in fp32
                gl = work[2][:g.numel()].view(g.shape).copy_(g)
                if grad_x is not None:
                    grad_x[lo:hi].copy_(gl.t() @ w).mul_(f)
                if grad_w is not None:
                    grad_w[:vocab_size].add_(gl @ (xs.float() * f).to(x.dtype))
                continue
            if grad_x is not None:
                torch.mm(g.t(), w, out=grad_x[lo:hi]).mul_(f)
            if grad_w is not None:
                grad_w[:vocab_size].addmm_(g, xs.float() * f)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors  # ours alone, used once: scaled in place (no second copy)
        gx = grad_x.mul_(grad_out).to(ctx.x_dtype) if grad_x is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gx, gw, None, None, None, None, None


def linear_softcap_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                                 vocab_size: int | None = None, softcap: float = 0.0,
                                 reduction: str = "mean", chunk_rows: int = 512) -> torch.Tensor:
    """Cross-entropy of `softcap * tanh(x @ weight[:vocab_size].T / softcap)` against `targets`.

    x: (..., C) final hidden states; weight: (V_padded, C) LM head; targets: (...) token ids, -1 ignored.
    reduction: "mean" over non-ignored targets (0 if there are none) or "sum". Gradients flow to x and
    weight; the loss must be back-propagated at most once (the gradients are computed in forward).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for the fused loss, not {reduction!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, not {chunk_rows}")
    vocab_size = weight.size(0) if vocab_size is None else vocab_size
    if not 0 < vocab_size <= weight.size(0):
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{weight.size(0)} (the head's rows)")
    x2 = x.reshape(-1, x.size(-1))
    t2 = targets.reshape(-1)
    if t2.numel() != x2.size(0):
        raise ValueError(f"{t2.numel()} targets for {x2.size(0)} positions")
    return _LinearSoftcapCE.apply(x2, weight, t2, vocab_size, float(softcap or 0.0), reduction, chunk_rows)

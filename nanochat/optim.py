"""Muon for the transformer's matrices, AdamW for everything else, in one optimizer.

One `MuonAdamW` holds parameter groups of two kinds:

- `"muon"`: 2-D block matrices. Nesterov momentum, then an odd matrix polynomial (Polar Express,
  arXiv 2505.16932, or the classic Newton-Schulz quintic) that pushes every singular value towards
  1, then optionally NorMuon's per-row/column variance normalisation, cautious weight decay and
  the `sqrt(max(1, rows/cols))` learning-rate factor on the update (weight decay uses the plain
  group lr, `p -= lr * wd * p`, as torch.optim.Muon does). Matrices of equal shape are stacked into
  a (K, R, C) tensor so one batched call orthogonalises them all.
- `"adamw"`: embeddings, LM head, scalars. Plain AdamW with fp32 math and decoupled weight decay
  (the same update as `torch.optim.AdamW`).

Schedules write `group["lr"]`, `group["momentum"]` (Muon) and `group["weight_decay"]` before a
step; nothing is compiled against them, so changing them costs nothing. Every group keeps the
`initial_lr` it was built with.

Distributed (ZeRO-2 style, automatic when torch.distributed runs with world size W > 1; no DDP
wrapper): each rank calls backward on its own micro-batches, and `step()` averages the gradients:
- a Muon stack of n matrices is cut into buckets of m*W consecutive matrices (about `bucket_bytes`;
  the last padded with zero matrices), each reduce-scattered, so rank r owns the r-th run of m matrices
  of every bucket: it keeps their momentum, orthogonalises them and all-gathers them;
- an AdamW tensor whose first dimension divides by W (and is large enough) is reduce-scattered
  along that dimension; any other one is reduced to an owner rank (round robin) that updates it and
  broadcasts it back.
`overlap_backward()` before the last backward starts each reduction from gradient hooks as soon as
its gradients are final (the LM head's first, then the buckets layer group by layer group), in one
order on every rank; the rest start at `launch_reductions()`/`step()`. Each unit waits only for its
own reductions, so the communication of later units also overlaps the math of earlier ones.
`reduce_dtype=torch.bfloat16` halves the bytes reduced (the sum is rounded to bf16; the update math
stays fp32). Optimizer state lives only on the rank that owns it; `state_dict()` is per rank.

Shape legend: K matrices per stack on this rank, R rows, C columns.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat.sizing import BASE_LRS

# Keller Jordan's Newton-Schulz quintic, tuned for a steep slope at 0 rather than exact convergence.
QUINTIC_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express: a different (a, b, c) per iteration, optimal for the worst case over [eps, 1].
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Polar Express divides by 1.01 * ||G||_F so rounding cannot push the top singular value above 1.
POLAR_EXPRESS_INFLATION = 1.01
ORTH_METHODS = ("polar_express", "quintic")
# PyTorch's fused AdamW kernel (what torch.optim.AdamW(fused=True) calls); private API, so optional
_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)

MUON_DEFAULTS = dict(weight_decay=0.0, momentum=0.95, nesterov=True, orth="polar_express", ns_steps=5,
                     normuon=True, beta2=0.9, cautious_wd=True, orth_dtype=torch.bfloat16)
ADAMW_DEFAULTS = dict(weight_decay=0.0, betas=(0.8, 0.95), eps=1e-10)


def orthogonalize(G: torch.Tensor, method: str = "polar_express", steps: int = 5,
                  dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U @ V^T of G = U S V^T for a (R, C) or (K, R, C) tensor; returned in `dtype`.

    The Frobenius normalisation happens in G's own precision, the iterations in `dtype`. Tall
    matrices iterate with X^T X, so the Gram matrix is always the smaller (min(R, C))^2 one.
    """
    if method == "polar_express":
        if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"polar_express supports 1..{len(POLAR_EXPRESS_COEFFS)} steps, got {steps}")
        coeffs, inflation = POLAR_EXPRESS_COEFFS[:steps], POLAR_EXPRESS_INFLATION
    elif method == "quintic":
        coeffs, inflation = (QUINTIC_COEFFS,) * steps, 1.0
    else:
        raise ValueError(f"unknown orthogonalisation {method!r}: use one of {ORTH_METHODS}")
    if G.ndim not in (2, 3):
        raise ValueError(f"orthogonalize expects a (R, C) or (K, R, C) tensor, got shape {tuple(G.shape)}")
    X = G.unsqueeze(0) if G.ndim == 2 else G
    tall = X.size(-2) > X.size(-1)
    X = (X / (X.norm(dim=(-2, -1), keepdim=True) * inflation).clamp_min(eps)).to(dtype)
    for a, b, c in coeffs:
        A = X.mT @ X if tall else X @ X.mT  # (K, m, m), m = min(R, C)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)  # a*X + X@B | B@X
    return X.squeeze(0) if G.ndim == 2 else X


def normuon_scale(X: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: divide each row (or column) of the orthogonalised (K, R, C) update by the root of an
    EMA of its mean square, then restore each matrix's Frobenius norm. One statistic per index of
    the larger dimension; `second_moment` is (K, R, 1) or (K, 1, C) and is updated in place."""
    reduce_dim = -1 if X.size(-2) >= X.size(-1) else -2
    v_mean = X.square().mean(dim=reduce_dim, keepdim=True)
    second_moment.lerp_(v_mean, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    sq_norm_before = v_mean.sum(dim=(-2, -1), keepdim=True)  # both norms share the factor size(reduce_dim)
    sq_norm_after = (v_mean * scale.square()).sum(dim=(-2, -1), keepdim=True)
    return X * (scale * (sq_norm_before / sq_norm_after.clamp_min(1e-30)).sqrt())


def muon_tail(p: torch.Tensor, X: torch.Tensor, second_moment: torch.Tensor | None, lr: torch.Tensor,
              wd: torch.Tensor, lr_scale: float, beta2: float, normuon: bool, cautious_wd: bool) -> None:
    """The elementwise end of a Muon step on the (K, R, C) fp32 weights `p`, in place: NorMuon scaling of
    the orthogonalised X, (cautious) weight decay, then `p -= lr * lr_scale * X`. The same math as the
    eager path of MuonAdamW._muon_update, with lr and wd as 0-d tensors so that torch.compile (CUDA)
    neither recompiles when the schedule changes them nor needs them from the host."""
    X = X.float()
    if normuon:
        X = normuon_scale(X, second_moment, beta2)
    decay = lr * wd
    if cautious_wd:  # decay only where the step already pulls the weight towards 0
        p.sub_(p * (X * p > 0) * decay)
    else:
        p.mul_(1 - decay)
    p.sub_(X * (lr * lr_scale))


# ---------------------------------------------------------------------------------------------
# the plan: how each group's parameters are cut into units of work (and, distributed, owned)


@dataclass
class _MuonStack:
    """n matrices of one shape, dtype and device, updated as one (K, R, C) batch per rank, K = ceil(n / W).

    Distributed, the matrices are cut into K / m buckets of m*W consecutive ones (the last zero-padded), and
    rank r owns the r-th run of m matrices of every bucket: bucket b's matrices b*m*W + r*m + j (j < m) are
    rank r's slots b*m + j. A bucket's gradients are complete as soon as backward has passed its
    (consecutive) layers, so its reduce-scatter can start then. m (`group`) divides K and makes a bucket
    about `bucket_bytes`; m = K is one bucket, the cut of nanochat before buckets."""
    params: list[torch.nn.Parameter]
    per_rank: int  # K
    shape: tuple[int, int]
    world: int = 1
    group: int = 1  # m

    @property
    def buckets(self) -> int:
        return self.per_rank // self.group

    def index(self, rank: int, slot: int) -> int:
        """The matrix in `rank`'s `slot` (>= n: padding)."""
        b, j = divmod(slot, self.group)
        return (b * self.world + rank) * self.group + j

    def owned(self, rank: int) -> list[torch.nn.Parameter]:
        """`rank`'s matrices in slot order (the padding, always last, left out)."""
        return [self.params[i] for i in (self.index(rank, s) for s in range(self.per_rank)) if i < len(self.params)]

    @functools.cached_property
    def gathered_rows(self) -> list[int]:
        """Row of each matrix in the all-gathered (W*K, R, C) buffer, which is rank-major (rank r's slots at
        r*K .. r*K + K - 1)."""
        rows = {self.index(r, s): r * self.per_rank + s for r in range(self.world) for s in range(self.per_rank)}
        return [rows[i] for i in range(len(self.params))]


@dataclass
class _AdamParam:
    param: torch.nn.Parameter
    mode: str  # "local" (W == 1), "shard" (dim 0 split across ranks), "owner" (one rank updates)
    owner: int = 0


@dataclass
class _Pending:
    """A unit between launching its gradient reductions and finishing its parameter gather."""
    unit: object
    group: dict
    grad: torch.Tensor | None = None  # this rank's summed gradient (shard), fp32
    recv: torch.Tensor | None = None  # where the reductions write: `grad` itself, or a bf16 buffer
    reductions: list = field(default_factory=list)  # async handles of the reductions in flight
    work: object = None  # async handle of the parameter gather / broadcast
    finish: list = field(default_factory=list)  # (dst, src) copies once the gather is done
    keep: list = field(default_factory=list)  # buffers an in-flight collective still reads

    def wait_reductions(self) -> None:
        if self.reductions:
            for work in self.reductions:
                work.wait()
            self.reductions, self.keep = [], []  # (the buffers the reductions read)
        if self.recv is not None:
            if self.grad is None:
                self.grad = self.recv.float()  # no copy when the reduction ran in fp32
            self.recv = None

    def complete(self) -> None:
        self.wait_reductions()
        if self.work is not None:
            self.work.wait()
        if self.finish:  # one multi-tensor copy for the stack's matrices, not one launch per matrix
            torch._foreach_copy_([dst for dst, _ in self.finish], [src for _, src in self.finish])
        self.work, self.grad, self.finish, self.keep = None, None, [], []


class _Reduction:
    """One collective of a step's gradient averaging: bucket `bucket` of a Muon stack, or one AdamW tensor.
    `waiting` counts the parameters whose gradient the current backward has not finished yet."""

    def __init__(self, index: int, unit_index: int, unit, bucket: int, params: list):
        self.index, self.unit_index, self.unit, self.bucket, self.params = index, unit_index, unit, bucket, params
        self.reset(None)

    def reset(self, pend: _Pending | None) -> None:
        self.pend, self.buf = pend, None
        self.taken = [False] * len(self.params)
        self.waiting = len(self.params)


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW over parameter groups `{"params", "kind": "muon" | "adamw", "lr", ...}`.

    Keyword arguments set the defaults for Muon groups (a group's own keys win): `orth`
    ("polar_express" | "quintic"), `ns_steps`, `normuon`, `beta2` (NorMuon EMA), `cautious_wd`,
    `orth_dtype`, `momentum`, `nesterov`; `adam_betas`, `adam_eps` for AdamW groups.
    `shard_min_numel`: AdamW tensors smaller than this are never reduce-scattered.
    `compile`: torch.compile the orthogonalisation (CUDA only; hyperparameters never enter it).
    """

    def __init__(self, param_groups, *, orth: str = "polar_express", ns_steps: int = 5, normuon: bool = True,
                 beta2: float = 0.9, cautious_wd: bool = True, orth_dtype: torch.dtype = torch.bfloat16,
                 momentum: float = 0.95, nesterov: bool = True, adam_betas=(0.8, 0.95), adam_eps: float = 1e-10,
                 shard_min_numel: int = 16384, compile: bool = False, reduce_dtype: torch.dtype = torch.float32,
                 bucket_bytes: int = 64 * 2**20):
        self._kind_defaults = {
            "muon": dict(MUON_DEFAULTS, orth=orth, ns_steps=ns_steps, normuon=normuon, beta2=beta2,
                         cautious_wd=cautious_wd, orth_dtype=orth_dtype, momentum=momentum, nesterov=nesterov),
            "adamw": dict(ADAMW_DEFAULTS, betas=tuple(adam_betas), eps=adam_eps),
        }
        self.shard_min_numel = shard_min_numel
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"reduce_dtype must be torch.float32 or torch.bfloat16, got {reduce_dtype}")
        self.reduce_dtype = reduce_dtype
        self.bucket_bytes = bucket_bytes
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        self._orth_fn = orthogonalize
        self._tail_fn = None  # eager float path (CPU numerics, pinned by the golden test)
        if compile and torch.cuda.is_available():
            self._orth_fn = torch.compile(orthogonalize, dynamic=False)
            self._tail_fn = torch.compile(muon_tail, dynamic=False)
        self._scalars: dict = {}  # device -> reused 0-d fp32 tensors (step count, lr, wd)
        self._plan = None
        self._pending: list | None = None  # reductions started by launch_reductions(), used by step()
        self._items: list | None = None  # the step's collectives, in launch order (see _get_items)
        self._order: list[int] = []
        self._item_of: dict = {}
        self._next = 0  # how many of self._order have been launched this step
        self._hooks = None  # post-accumulate-grad hooks (overlap_backward)
        self._armed, self._order_agreed, self._seen = False, False, []
        self.overlap_stats = {"in_backward": 0, "total": 0}  # of the last step's reductions
        super().__init__(list(param_groups), defaults={})

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in self._kind_defaults:
            raise ValueError(f"every param group needs kind='muon' or kind='adamw', got {kind!r}")
        if "lr" not in param_group:
            raise ValueError(f"a {kind} param group needs an 'lr'")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if kind == "muon":
            bad = [tuple(p.shape) for p in params if p.ndim != 2]
            if bad:
                raise ValueError(f"Muon groups take 2-D matrices only, got shapes {bad}: put them in an 'adamw' group")
        group = dict(self._kind_defaults[kind], **param_group)
        if group.get("orth", "polar_express") not in ORTH_METHODS:
            raise ValueError(f"unknown orth {group['orth']!r}: use one of {ORTH_METHODS}")
        group.setdefault("initial_lr", group["lr"])
        group["params"] = params
        # (the base class's add_param_group/zero_grad import torch._dynamo on first use: ~5 s per process)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.is_leaf:
                raise ValueError(f"can only optimise leaf tensors (parameters), got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears in more than one place")
            seen.add(id(p))
        self.param_groups.append(group)
        self._plan = self._items = None
        if getattr(self, "_hooks", None):
            for h in self._hooks:
                h.remove()
            self._hooks, self._order_agreed = None, False

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    # -- planning ---------------------------------------------------------------------------------

    def _build_plan(self):
        W, n_owner = self.world_size, 0
        plan = []
        for group in self.param_groups:
            units = []
            if group["kind"] == "muon":
                by_key: dict = {}
                for p in group["params"]:
                    by_key.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
                for (shape, _, _), ps in by_key.items():
                    K = -(-len(ps) // W)
                    units.append(_MuonStack(ps, per_rank=K, shape=shape, world=W, group=self._group(K, shape)))
            else:
                for p in group["params"]:
                    if W == 1:
                        units.append(_AdamParam(p, "local"))
                    elif p.ndim >= 1 and p.shape[0] % W == 0 and p.numel() >= self.shard_min_numel:
                        units.append(_AdamParam(p, "shard"))
                    else:
                        units.append(_AdamParam(p, "owner", owner=n_owner % W))
                        n_owner += 1
            plan.append(units)
        return plan

    def _group(self, K: int, shape: tuple[int, int]) -> int:
        """Matrices per rank per bucket: the largest divisor of K (no padding beyond K*W) whose bucket of
        m*W matrices stays within bucket_bytes (at least 1)."""
        per_matrix = shape[0] * shape[1] * torch.empty((), dtype=self.reduce_dtype).element_size()
        target = max(1, self.bucket_bytes // max(1, per_matrix * self.world_size))
        return max(d for d in range(1, K + 1) if K % d == 0 and d <= target) if K else 1

    def _get_plan(self):
        if self._plan is None:
            self._plan = self._build_plan()
        return self._plan

    # -- device scalars (no host syncs) ------------------------------------------------------------

    def _scalar_buffers(self, device: torch.device) -> torch.Tensor:
        buf = self._scalars.get(device)
        if buf is None:
            buf = self._scalars[device] = torch.zeros(3, dtype=torch.float32, device=device)
        return buf

    def _step_scalar(self, device: torch.device, t: int) -> torch.Tensor:
        # safe to reuse across parameters: kernels on one stream run in order, each reads it before the next fill
        step = self._scalar_buffers(device)[0]
        step.fill_(float(t))
        return step

    def _device_scalars(self, device: torch.device, lr: float, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self._scalar_buffers(device)
        buf[1].fill_(lr)
        buf[2].fill_(wd)
        return buf[1], buf[2]

    # -- gradient reductions ---------------------------------------------------------------------

    def _get_items(self) -> list[_Reduction]:
        """The step's collectives in their fixed launch order (the same on every rank)."""
        if self._items is None:
            items = []
            for ui, unit in enumerate(u for units in self._get_plan() for u in units):
                if isinstance(unit, _MuonStack):
                    size = unit.group * self.world_size if self.world_size > 1 else len(unit.params)
                    for b in range(unit.buckets if self.world_size > 1 else 1):
                        items.append(_Reduction(len(items), ui, unit, b, unit.params[b * size:(b + 1) * size]))
                else:
                    items.append(_Reduction(len(items), ui, unit, -1, [unit.param]))
            self._items = items
            self._order = list(range(len(items)))
            self._item_of = {id(p): (item, i) for item in items for i, p in enumerate(item.params)}
        return self._items

    def _begin(self) -> None:
        """Fresh per-step bookkeeping: one _Pending per unit, every reduction waiting for its gradients."""
        items = self._get_items()
        self._pending = [_Pending(unit, group)
                         for group, units in zip(self.param_groups, self._get_plan()) for unit in units]
        for item in items:
            item.reset(self._pending[item.unit_index])
        self._next = 0

    def overlap_backward(self) -> None:
        """Arm the next backward pass to start the gradient reductions while it runs (distributed only).

        Call it before the last micro-batch's backward. Every parameter then has a post-accumulate-grad
        hook: a Muon bucket's reduce-scatter starts once backward has produced the gradients of its m*W
        matrices (a layer group), an AdamW tensor's once its own gradient is done (the LM head's first).
        They start in one fixed order on every rank: at the first overlapped step the planned one, then
        the order rank 0 saw its gradients finish in. A reduction whose turn has come waits for the one
        before it. `launch_reductions()` (or `step()`) starts the rest. Under a whole-model
        torch.compile, backward is one node that finishes every gradient at its end, so nothing starts
        early there (compile per block for that)."""
        if self.world_size == 1:
            return
        if self._hooks is None:
            self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                           for group in self.param_groups for p in group["params"]]
        self._begin()
        self._armed = True
        self._seen = []

    @property
    def reductions_started(self) -> int:
        """How many of this step's reductions have been started so far."""
        return self._next

    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        item, i = self._item_of[id(p)]
        self._take(item, i)
        item.waiting -= 1
        if item.waiting == 0:
            self._seen.append(item.index)
            self._launch_in_order()

    def _launch_in_order(self) -> None:
        items = self._items
        while self._next < len(self._order) and items[self._order[self._next]].waiting == 0:
            self._launch(items[self._order[self._next]])
            self._next += 1

    @torch.no_grad()
    def launch_reductions(self) -> None:
        """Start averaging every gradient across ranks now; the next step() uses these reductions.

        The training step calls it right after backward, before it waits on the host for the step's
        loss/stop flags: on GPUs the reduce-scatters then run while the host syncs and launches the
        optimizer, instead of starting after it. After `overlap_backward()` it starts only those that
        backward did not. The gradients must not change until step()."""
        armed, self._armed = self._armed, False
        if not armed:
            self._begin()
        early = self._next
        for index in self._order[self._next:]:
            self._launch(self._items[index])
        self._next = len(self._order)
        self.overlap_stats = {"in_backward": early if armed else 0, "total": len(self._order)}
        if armed and not self._order_agreed:
            # from now on, launch in the order the gradients came (rank 0's, so that every rank agrees)
            first = set(self._seen)
            seen = self._seen + [i for i in range(len(self._items)) if i not in first]
            box = [seen]
            dist.broadcast_object_list(box, src=0)
            self._order, self._order_agreed = list(box[0]), True

    def discard_reductions(self) -> None:
        """Finish and drop reductions launched for a step that will not be applied (a non-finite loss)."""
        self._armed = False
        for pend in self._pending or []:
            pend.wait_reductions()
        self._pending = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending is None or self._armed:
            self.launch_reductions()
        pending, self._pending = self._pending, None
        for pend in pending:  # each unit waits only for its own reductions, then starts its gather
            pend.wait_reductions()
            if isinstance(pend.unit, _MuonStack):
                self._muon_update(pend)
            else:
                self._adam_update(pend)
            if pend.work is None:  # nothing in flight (single process): write back now, free the buffers
                pend.complete()
        for pend in pending:
            pend.complete()
        return loss

    def _take(self, item: _Reduction, i: int) -> None:
        """Gradient i of `item` is final: a Muon bucket copies it into its reduction buffer now."""
        if item.taken[i]:
            return
        item.taken[i] = True
        if isinstance(item.unit, _MuonStack) and self.world_size > 1:
            g = item.params[i].grad
            if item.buf is None:  # (m*W, R, C): the bucket's matrices, zero padding included
                item.buf = torch.zeros((item.unit.group * self.world_size, *item.unit.shape), dtype=self.reduce_dtype,
                                       device=item.params[i].device)
            if g is not None:
                item.buf[i].copy_(g)

    @torch.no_grad()
    def _launch(self, item: _Reduction) -> None:
        """Start one reduction (every gradient of it is final), or, single process, just collect the gradient."""
        for i in range(len(item.params)):
            self._take(item, i)
        pend, W, unit = item.pend, self.world_size, item.unit
        if isinstance(unit, _MuonStack):
            if W == 1:
                pend.grad = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p)
                                         for p in unit.params]).float()  # (n, R, C)
                return
            if pend.recv is None:
                pend.recv = item.buf.new_empty((unit.per_rank, *unit.shape))
            m = unit.group  # rank r receives the bucket's r-th run of m matrices: its slots b*m .. b*m + m - 1
            pend.reductions.append(_reduce_scatter(pend.recv[item.bucket * m:(item.bucket + 1) * m], item.buf))
            pend.keep.append(item.buf)
            item.buf = None
            return
        p = unit.param
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if unit.mode == "local":
            pend.grad = g.float()
        elif unit.mode == "shard":
            g = g.to(self.reduce_dtype).contiguous()
            pend.recv = g.new_empty((p.shape[0] // W, *p.shape[1:]))
            pend.reductions.append(_reduce_scatter(pend.recv, g))
            pend.keep.append(g)
        else:
            pend.recv = g.to(self.reduce_dtype, copy=True).contiguous()
            pend.reductions.append(dist.reduce(pend.recv, dst=unit.owner, op=dist.ReduceOp.SUM, async_op=True))

    def _muon_update(self, pend: _Pending) -> None:
        group, stack, W = pend.group, pend.unit, self.world_size
        g = pend.grad  # (K, R, C) fp32, this rank's matrices (zero padding included)
        if W > 1:
            g.div_(W)
        owned = stack.owned(self.rank)
        if len(owned) == g.size(0):  # every slot owned (always when W == 1): one stacked copy, no loop
            p = torch.stack(owned).to(g.dtype)
        else:  # the last rank's share is padded with zero matrices
            p = torch.zeros_like(g)
            for i, q in enumerate(owned):
                p[i].copy_(q)
        state = self.state[stack.params[0]]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf, mom = state["momentum_buffer"], group["momentum"]
        buf.lerp_(g, 1 - mom)
        update = g.lerp_(buf, mom) if group["nesterov"] else buf
        X = self._orth_fn(update, group["orth"], group["ns_steps"], group["orth_dtype"])
        if group["normuon"] and "second_moment" not in state:
            R, C = stack.shape
            state["second_moment"] = g.new_zeros((g.size(0), R, 1) if R >= C else (g.size(0), 1, C))
        rows, cols = stack.shape
        if self._tail_fn is not None:
            # compiled elementwise tail (NorMuon, cautious decay, update): the schedule's lr / wd enter as
            # 0-d device tensors, so changing them neither recompiles nor copies from the host
            lr_t, wd_t = self._device_scalars(p.device, group["lr"], group["weight_decay"])
            self._tail_fn(p, X, state.get("second_moment"), lr_t, wd_t, math.sqrt(max(1.0, rows / cols)),
                          group["beta2"], group["normuon"], group["cautious_wd"])
        else:
            X = X.float()
            if group["normuon"]:
                X = normuon_scale(X, state["second_moment"], group["beta2"])
            lr, wd = group["lr"], group["weight_decay"]
            if wd != 0:
                if group["cautious_wd"]:  # decay only where the step already pulls the weight towards 0
                    p.addcmul_(p, (X * p > 0).float(), value=-lr * wd)
                else:
                    p.mul_(1 - lr * wd)
            p.add_(X, alpha=-lr * math.sqrt(max(1.0, rows / cols)))
        if W == 1:
            pend.finish = list(zip(stack.params, p.unbind(0)))
            return
        K = stack.per_rank
        full = p.new_empty((K * W, *stack.shape), dtype=stack.params[0].dtype)  # rank-major: (W, K) slots
        pend.keep = [p.to(full.dtype)]
        pend.work = _all_gather(full, pend.keep[0])
        pend.finish = [(q, full[row]) for q, row in zip(stack.params, stack.gathered_rows)]

    def _adam_update(self, pend: _Pending) -> None:
        group, unit, W, rank = pend.group, pend.unit, self.world_size, self.rank
        param = unit.param
        if unit.mode == "owner" and rank != unit.owner:
            pend.work = dist.broadcast(param.data, src=unit.owner, async_op=True)
            return
        g = pend.grad
        if W > 1:
            g.div_(W)
        if unit.mode == "shard":
            n = param.shape[0] // W
            target = param.data[rank * n:(rank + 1) * n]
        else:
            target = param.data
        p = target if target.dtype == torch.float32 else target.float()
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t, (beta1, beta2), lr, wd = state["step"], group["betas"], group["lr"], group["weight_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if _FUSED_ADAMW is not None and p.device.type in ("cpu", "cuda") and g.dtype == p.dtype:
            # PyTorch's fused AdamW kernel: the same update as below in one pass over the five
            # tensors (5x faster on CPU for the 8M-entry embedding and head of a depth-4 model)
            # the step count as a reused device scalar filled in place: no host-to-device copy (and
            # sync) per parameter per step, as torch.tensor(t, device=cuda) would make
            _FUSED_ADAMW([p], [g], [m], [v], [], [self._step_scalar(p.device, t)], lr=lr, beta1=beta1,
                         beta2=beta2, weight_decay=wd, eps=group["eps"], amsgrad=False, maximize=False)
        else:
            if wd != 0:
                p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        if p is not target:
            target.copy_(p)
        if unit.mode == "shard":
            pend.keep = [target.clone()]
            pend.work = _all_gather(param.data, pend.keep[0])
        elif unit.mode == "owner":
            pend.work = dist.broadcast(param.data, src=unit.owner, async_op=True)

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's state: plain tensors, ints, floats and strings (safe for torch.load). `layout` says how
        each unit was cut across ranks, so that `merge_rank_states` can rebuild the unsharded state.

        The tensors are the live ones (as torch.optim's state_dict returns them), not copies: a checkpoint
        saves them at once, and a copy of the whole state on the GPU could itself run out of memory, at
        a preemption for instance. Copy them to keep a snapshot while training goes on."""
        groups, states, layout = [], [], []
        for group, units in zip(self.param_groups, self._get_plan()):
            g = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in group.items() if k != "params"}
            g["param_shapes"] = [tuple(p.shape) for p in group["params"]]
            groups.append(g)
            states.append([dict(self.state[_key(u)]) if _key(u) in self.state else {} for u in units])
            layout.append([{"n": len(u.params), "per_rank": u.per_rank, "group": u.group}
                           if isinstance(u, _MuonStack)
                           else {"mode": u.mode, "owner": u.owner} for u in units])
        return {"world_size": self.world_size, "rank": self.rank, "param_groups": groups, "state": states,
                "layout": layout}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load this rank's own state (same world size), or an unsharded state (`world_size` 1: a single-process
        run's, or `merge_rank_states` of another world size's), from which this rank cuts its shard."""
        saved_world, saved_rank = state_dict.get("world_size"), state_dict.get("rank")
        reshard = saved_world == 1 and self.world_size > 1
        if saved_world != self.world_size and not reshard:
            raise ValueError(f"this optimizer state was written by a run with {saved_world} ranks (rank "
                             f"{saved_rank}), but this run has world size {self.world_size}: merge the ranks' "
                             f"states first (nanochat.optim.merge_rank_states, which "
                             f"checkpoint_manager.load_optimizer_state does)")
        if not reshard and self.world_size > 1:
            saved_groups = [_group_of(lay) for g in state_dict.get("layout", []) for lay in g if "n" in lay]
            own_groups = [u.group for units in self._get_plan() for u in units if isinstance(u, _MuonStack)]
            if saved_groups != own_groups:
                raise LayoutChanged(f"this optimizer state cuts its Muon stacks into buckets of {saved_groups} "
                                    f"matrices per rank, this optimizer into {own_groups} (another nanochat "
                                    f"version or bucket size): merge the ranks' states first (nanochat.optim."
                                    f"merge_rank_states; checkpoint_manager.load_optimizer_state(merge=True))")
        if not reshard and saved_rank != self.rank:
            raise ValueError(f"this optimizer state belongs to rank {saved_rank}, but it is being loaded on rank "
                             f"{self.rank}: load optim_..._rank{self.rank}.pt on each rank")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(saved_groups)} param groups, this one "
                             f"{len(self.param_groups)}: build the optimizer the same way as the saved run")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            shapes = [tuple(p.shape) for p in group["params"]]
            if [tuple(s) for s in saved["param_shapes"]] != shapes or saved["kind"] != group["kind"]:
                raise ValueError(f"param group {i} does not match the saved one (kind {saved['kind']} vs "
                                 f"{group['kind']}, shapes differ or not): is this the same model?")
        self.state.clear()
        for saved, group, units, unit_states in zip(saved_groups, self.param_groups, self._get_plan(),
                                                    state_dict["state"]):
            for k, v in saved.items():
                if k != "param_shapes":
                    group[k] = _parse_dtype(v) if k == "orth_dtype" else v
            for unit, unit_state in zip(units, unit_states):
                if reshard:
                    unit_state = self._own_shard(unit, unit_state)
                if unit_state:
                    device = _key(unit).device
                    self.state[_key(unit)] = {k: (v.to(device, copy=True) if torch.is_tensor(v) else v)
                                              for k, v in unit_state.items()}

    def _own_shard(self, unit, full: dict) -> dict:
        """This rank's part of one unit's unsharded state (the inverse of `merge_rank_states`)."""
        W, r = self.world_size, self.rank
        if not full:
            return {}
        if isinstance(unit, _MuonStack):
            out = {}
            for k, v in full.items():
                if torch.is_tensor(v) and v.ndim >= 1:
                    out[k] = _stack_shard(v, unit.per_rank, W, unit.group, r)
                else:
                    out[k] = v
            return out
        if unit.mode == "owner":
            return full if r == unit.owner else {}
        if unit.mode == "shard":
            n = unit.param.shape[0] // W
            return {k: (v[r * n:(r + 1) * n] if torch.is_tensor(v) and v.ndim >= 1 else v) for k, v in full.items()}
        return full


def merge_rank_states(states: list[dict]) -> dict:
    """The unsharded (world size 1) optimizer state of a W-rank run, from its W per-rank `state_dict()`s: Muon
    stacks concatenated across ranks with their zero padding dropped, dim-0 shards concatenated, owner-rank
    states taken from their owner. `MuonAdamW.load_state_dict` loads it on any number of ranks."""
    states = sorted(states, key=lambda s: s.get("rank", 0))
    W = states[0].get("world_size")
    if [s.get("rank") for s in states] != list(range(W or 0)) or any(s.get("world_size") != W for s in states):
        raise ValueError(f"need the states of every rank 0..{W - 1} of one run, got ranks "
                         f"{[s.get('rank') for s in states]} of world sizes {sorted({s.get('world_size') for s in states})}")
    if W == 1:
        return states[0]
    if any("layout" not in s for s in states):
        raise ValueError("these optimizer states predate re-sharding (no 'layout'): resume with the world size "
                         f"that wrote them ({W} ranks)")
    merged, layout = [], []
    for gi, group_layout in enumerate(states[0]["layout"]):
        units, unit_layout = [], []
        for ui, lay in enumerate(group_layout):
            per_rank = [s["state"][gi][ui] for s in states]
            if "n" in lay:
                full = _concat_states(per_rank, limit=lay["n"], group=_group_of(lay))
                unit_layout.append({"n": lay["n"], "per_rank": lay["n"], "group": lay["n"]})
            else:
                if lay["mode"] == "shard":
                    full = _concat_states(per_rank)
                elif lay["mode"] == "owner":
                    full = per_rank[lay["owner"]]
                else:
                    full = per_rank[0]
                unit_layout.append({"mode": "local", "owner": 0})
            units.append(full)
        merged.append(units)
        layout.append(unit_layout)
    return {"world_size": 1, "rank": 0, "param_groups": states[0]["param_groups"], "state": merged,
            "layout": layout, "merged_from_world_size": W}


def _stack_shard(v: torch.Tensor, K: int, W: int, m: int, r: int) -> torch.Tensor:
    """Rank r's (K, ...) slots of a Muon stack's (n, ...) state: zero-padded to K*W matrices, cut into
    buckets of m*W, the r-th run of m of each bucket (see _MuonStack)."""
    padded = torch.cat([v, v.new_zeros((K * W - v.shape[0], *v.shape[1:]))])
    return padded.view(K // m, W, m, *v.shape[1:])[:, r].reshape(K, *v.shape[1:]).clone()


class LayoutChanged(ValueError):
    """A per-rank optimizer state cut into other buckets than this optimizer's: load it merged."""


def _group_of(lay: dict) -> int:
    # states written before buckets (no "group") cut each stack in one piece: m = K
    return lay.get("group", lay["per_rank"])


def _concat_states(per_rank: list[dict], limit: int | None = None, group: int | None = None) -> dict:
    """Per-rank unit states joined along dim 0: concatenated, or for a Muon stack (`group` m: rank r's slot
    b*m + j is matrix (b*W + r)*m + j) put back in matrix order."""
    if not any(per_rank):
        return {}
    out = {}
    for k, v in per_rank[0].items():
        if torch.is_tensor(v) and v.ndim >= 1:
            parts = [s[k] for s in per_rank]
            if group is None:
                cat = torch.cat(parts)
            else:  # (W, K, ...) -> (W, K/m, m, ...) -> (K/m, W, m, ...) -> matrix order
                W, K, rest = len(parts), parts[0].shape[0], parts[0].shape[1:]
                cat = torch.stack(parts).view(W, K // group, group, *rest).transpose(0, 1).reshape(W * K, *rest)
            out[k] = cat[:limit] if limit is not None else cat
        else:
            out[k] = v  # step counters agree across ranks
    return out


def _key(unit):
    return unit.params[0] if isinstance(unit, _MuonStack) else unit.param


def _parse_dtype(value):
    if isinstance(value, str) and value.startswith("torch."):
        return getattr(torch, value.split(".", 1)[1])
    return value


# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor to *_single (the old names remain,
# deprecated); torch 2.11, what the GPU machines run, has only the old ones. "auto" takes the new names
# where they exist; tests run both paths on gloo ("single", "tensor").
COLLECTIVE_API = "auto"


def _collective(new: str, old: str):
    if COLLECTIVE_API == "tensor" or (COLLECTIVE_API == "auto" and not hasattr(dist, new)):
        return getattr(dist, old)
    if COLLECTIVE_API not in ("auto", "single"):
        raise ValueError(f"COLLECTIVE_API must be auto, single or tensor; got {COLLECTIVE_API!r}")
    return getattr(dist, new)


def _reduce_scatter(out: torch.Tensor, full: torch.Tensor):
    fn = _collective("reduce_scatter_single", "reduce_scatter_tensor")
    return fn(out, full, op=dist.ReduceOp.SUM, async_op=True)


def _all_gather(full: torch.Tensor, shard: torch.Tensor):
    fn = _collective("all_gather_single", "all_gather_into_tensor")
    return fn(full, shard, async_op=True)


# ---------------------------------------------------------------------------------------------


def build_optimizer(model, *, matrix_lr: float = BASE_LRS["matrix_lr"], embedding_lr: float = BASE_LRS["embedding_lr"],
                    unembedding_lr: float = BASE_LRS["unembedding_lr"], scalar_lr: float = BASE_LRS["scalar_lr"],
                    weight_decay: float = 0.0, adam_betas=(0.8, 0.95), **muon_kwargs) -> MuonAdamW:
    """The standard optimizer for a model with `param_groups()` -> {"matrix", "embedding", "lm_head", "scalar"}.

    Weight decay applies to the Muon (matrix) group only; `muon_kwargs` go to `MuonAdamW`
    (orth, ns_steps, normuon, beta2, cautious_wd, orth_dtype, momentum, compile, ...).
    """
    named = model.param_groups()
    expected = {"matrix", "embedding", "lm_head", "scalar"}
    if set(named) != expected:
        raise ValueError(f"model.param_groups() must return the keys {sorted(expected)}, got {sorted(named)}")
    if hasattr(model, "parameters"):
        grouped = [p for ps in named.values() for p in ps]
        if len({id(p) for p in grouped}) != len(grouped):
            raise ValueError("model.param_groups() lists a parameter twice")
        grouped_ids = {id(p) for p in grouped}
        missing = [tuple(p.shape) for p in model.parameters() if id(p) not in grouped_ids]
        if missing:
            raise ValueError(f"model.param_groups() leaves out parameters of shapes {missing}: they would never train")
    groups = [
        dict(kind="muon", params=list(named["matrix"]), lr=matrix_lr, weight_decay=weight_decay),
        dict(kind="adamw", params=list(named["embedding"]), lr=embedding_lr, betas=tuple(adam_betas)),
        dict(kind="adamw", params=list(named["lm_head"]), lr=unembedding_lr, betas=tuple(adam_betas)),
        dict(kind="adamw", params=list(named["scalar"]), lr=scalar_lr, betas=tuple(adam_betas)),
    ]
    return MuonAdamW([g for g in groups if g["params"]], adam_betas=adam_betas, **muon_kwargs)

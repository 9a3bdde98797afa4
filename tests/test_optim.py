"""MuonAdamW against independent references: torch.optim.AdamW, torch.optim.Muon, the SVD, and the
single-process optimizer itself for the multi-process (gloo) runs."""

import copy
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import nanochat.optim as optim_module
from nanochat.optim import (
    LayoutChanged,
    MuonAdamW,
    build_optimizer,
    merge_rank_states,
    normuon_scale,
    orthogonalize,
)
from tests.helpers import free_port


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: one thread is faster and does not fight other jobs for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# orthogonalisation


def _with_spectrum(rows, cols, smallest, seed):
    """A (rows, cols) matrix with singular values log-spaced from 1 down to `smallest`."""
    gen = torch.Generator().manual_seed(seed)
    m = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(cols, m, generator=gen))
    return U @ torch.diag(torch.logspace(0, math.log10(smallest), m)) @ V.T


# Measured (fp32 and bf16, 5 iterations): the quintic maps Gaussian matrices into [0.68, 1.14];
# Polar Express into [0.86, 1.14]. Bands below leave ~0.03 of slack for rounding.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 40)])
@pytest.mark.parametrize("method,band", [("quintic", (0.65, 1.17)), ("polar_express", (0.83, 1.17))])
def test_orthogonalize_gaussian_band(method, band, shape, dtype):
    G = torch.randn(3, *shape)
    X = orthogonalize(G, method, steps=5, dtype=dtype)
    assert X.shape == G.shape and X.dtype == dtype
    s = torch.linalg.svdvals(X.float())
    assert band[0] < s.min() and s.max() < band[1], (s.min(), s.max())
    # same singular vectors as G: X is (close to) the polar factor U V^T
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(X.float(), U @ Vh, atol=0.2)
    # batched == one at a time
    one = orthogonalize(G[1], method, steps=5, dtype=dtype)
    torch.testing.assert_close(one.float(), X[1].float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_polar_express_reaches_small_singular_values_the_quintic_misses():
    # singular values from 1 down to 3e-3 (1.2e-3 of the Frobenius norm). Measured: Polar Express
    # [0.859, 1.141]; the quintic [0.570, 1.202] (its band starts near 3.7e-3 of the norm).
    G = _with_spectrum(64, 64, 3e-3, seed=1)
    s_pe = torch.linalg.svdvals(orthogonalize(G, "polar_express", dtype=torch.float32))
    s_q = torch.linalg.svdvals(orthogonalize(G, "quintic", dtype=torch.float32))
    assert 0.83 < s_pe.min() and s_pe.max() < 1.17
    assert s_q.min() < 0.65 and s_q.max() < 1.23


def test_orthogonalize_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown orthogonalisation"):
        orthogonalize(torch.randn(4, 4), "cubic")
    with pytest.raises(ValueError, match="1..5 steps"):
        orthogonalize(torch.randn(4, 4), "polar_express", steps=6)


# ---------------------------------------------------------------------------------------------
# single process: AdamW and Muon against PyTorch's own optimizers


def _clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


@pytest.mark.parametrize("fused_kernel", [True, False], ids=["torch-fused-kernel", "own-ops"])
def test_adamw_matches_torch_adamw_with_schedules(fused_kernel, monkeypatch):
    if not fused_kernel:
        monkeypatch.setattr(optim_module, "_FUSED_ADAMW", None)
    elif optim_module._FUSED_ADAMW is None:
        pytest.skip("this PyTorch has no torch._fused_adamw_")
    shapes = [(11, 6), (7,), (), (3, 4, 5)]
    ours_p = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = _clone_params(ours_p)
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ours = MuonAdamW([dict(kind="adamw", params=ours_p, **kw)])
    ref = torch.optim.AdamW(ref_p, **kw)
    assert ours.param_groups[0]["initial_lr"] == 0.01
    for step in range(12):
        for opt in (ours, ref):  # schedules write into the groups between steps
            opt.param_groups[0]["lr"] = 0.01 * (1 - step / 12)
            opt.param_groups[0]["weight_decay"] = 0.1 * (step % 3)
        for p, q in zip(ours_p, ref_p):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_adamw_bf16_param_keeps_fp32_math():
    p = nn.Parameter(torch.randn(8, 4).bfloat16())
    q = nn.Parameter(p.detach().float().clone())
    ours = MuonAdamW([dict(kind="adamw", params=[p], lr=0.01)])
    ref = torch.optim.AdamW([q], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    g = torch.randn(8, 4)
    p.grad, q.grad = g.bfloat16(), g.bfloat16().float()
    ours.step()
    ref.step()
    assert p.dtype == torch.bfloat16 and ours.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p.float(), q.bfloat16().float())


@pytest.mark.parametrize("orth_dtype", [torch.float32, torch.bfloat16])
def test_muon_matches_torch_muon(orth_dtype):
    # torch.optim.Muon: Nesterov via lerp, classic quintic in bf16, lr * sqrt(max(1, rows/cols)),
    # decoupled decay p *= 1 - lr * wd. Ours with quintic, no NorMuon, plain decay is the same method.
    # torch casts to bf16 before normalising, we after: each step's update agrees to bf16 rounding,
    # measured 2-5% (relative Frobenius) over seeds; a missing lr factor or decay term would be 30%+.
    shapes = [(16, 8), (16, 8), (8, 24), (12, 12)]
    ours_p = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref_p = _clone_params(ours_p)
    ours = MuonAdamW([dict(kind="muon", params=ours_p, lr=0.02, weight_decay=0.1)], orth="quintic",
                     normuon=False, cautious_wd=False, orth_dtype=orth_dtype)
    ref = torch.optim.Muon(ref_p, lr=0.02, weight_decay=0.1, momentum=0.95)
    for step in range(10):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = 0.02 * (1 + step) / 10
            opt.param_groups[0]["momentum"] = 0.85 + 0.01 * step
            opt.param_groups[0]["weight_decay"] = 0.1 * (step % 2)
        before = [p.detach().clone() for p in ours_p]
        for p, q in zip(ours_p, ref_p):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q, b in zip(ours_p, ref_p, before):
            d_ours, d_ref = p.detach() - b, q.detach() - b
            assert (d_ours - d_ref).norm() < 0.08 * d_ref.norm(), (step, p.shape)
            p.data.copy_(q.data)  # re-sync so rounding differences cannot accumulate


def _one_muon_step(p0, grad, **kw):
    p = nn.Parameter(p0.clone())
    opt = MuonAdamW([dict(kind="muon", params=[p], lr=kw.pop("lr", 0.02), weight_decay=kw.pop("wd", 0.0))],
                    orth_dtype=torch.float32, **kw)
    p.grad = grad.clone()
    opt.step()
    return p.detach() - p0, opt


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    p0, grad = torch.randn(24, 12), torch.randn(24, 12)
    lr, wd = 0.02, 0.5
    d_plain, _ = _one_muon_step(p0, grad, lr=lr, normuon=False)
    d_cautious, _ = _one_muon_step(p0, grad, lr=lr, wd=wd, normuon=False)
    d_full, _ = _one_muon_step(p0, grad, lr=lr, wd=wd, normuon=False, cautious_wd=False)
    update = -d_plain  # the step subtracts lr_eff * update
    agree = (update * p0) > 0
    assert 0.2 < agree.float().mean() < 0.8
    torch.testing.assert_close(d_cautious - d_plain, -lr * wd * p0 * agree, atol=1e-6, rtol=0)
    torch.testing.assert_close(d_full - d_plain, -lr * wd * p0, atol=1e-6, rtol=0)
    # the 24x12 matrix gets lr * sqrt(24 / 12): the plain update has norm lr * sqrt(2) * ||O||_F
    O = orthogonalize(grad, dtype=torch.float32)
    torch.testing.assert_close(d_plain.norm(), lr * math.sqrt(2) * O.norm(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(24, 12), (12, 24)])
def test_normuon_equalises_rows_and_keeps_the_norm(shape):
    p0, grad = torch.randn(shape), torch.randn(shape)
    d_off, _ = _one_muon_step(p0, grad, normuon=False)
    d_on, opt = _one_muon_step(p0, grad, normuon=True)
    torch.testing.assert_close(d_on.norm(), d_off.norm(), rtol=1e-5, atol=0)
    # first step: the EMA holds (1 - beta2) * mean square, so every row (column, for a wide matrix)
    # along the larger dimension ends with the same RMS
    rms = d_on.square().mean(dim=1 if shape[0] >= shape[1] else 0).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, rms.mean().item()), rtol=1e-4, atol=0)
    assert not torch.allclose(d_on, d_off, atol=1e-4)
    state = opt.state[opt.param_groups[0]["params"][0]]["second_moment"]
    assert state.shape == ((1, shape[0], 1) if shape[0] >= shape[1] else (1, 1, shape[1]))


def test_normuon_scale_against_a_loop():
    X, v = torch.randn(2, 6, 4), torch.rand(2, 6, 1)
    out = normuon_scale(X, v.clone(), beta2=0.9)
    for k in range(2):  # unbatched, row by row
        v_new = 0.9 * v[k, :, 0] + 0.1 * X[k].square().mean(dim=1)
        Y = X[k] / v_new.sqrt()[:, None]
        Y = Y * X[k].norm() / Y.norm()
        torch.testing.assert_close(out[k], Y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a toy model with every awkward shape: 5 same-shape 3x5 matrices, tall/wide/square matrices,
# an 11-row (odd) embedding, a 12-row one, a 7-wide head, an odd vector and a 0-d scalar


class ToyModel(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *s: nn.Parameter(torch.randn(*s, generator=gen) * 0.5)
        self.emb, self.emb2 = rnd(11, 8), rnd(12, 8)
        self.up, self.down, self.sq, self.proj = rnd(16, 8), rnd(8, 16), rnd(8, 8), rnd(8, 5)
        self.mats = nn.ParameterList([rnd(3, 5) for _ in range(5)])
        self.head, self.gain, self.mix = rnd(7, 8), rnd(7), nn.Parameter(torch.tensor(0.3))

    def param_groups(self):
        return {"matrix": [self.up, self.down, self.sq, self.proj, *self.mats], "embedding": [self.emb, self.emb2],
                "lm_head": [self.head], "scalar": [self.gain, self.mix]}

    def loss(self, idx, targets):
        x = self.emb[idx] + self.emb2[idx % 12]  # (B, T, 8)
        x = x + torch.relu(x @ self.up.T).square() @ self.down.T
        x = x @ self.sq.T
        h = x @ self.proj  # (B, T, 5)
        y = sum(torch.tanh(h @ m.T) for m in self.mats)  # (B, T, 3)
        logits = (x @ self.head.T) * self.gain + self.mix * nn.functional.pad(y, (0, 4))  # (B, T, 7)
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


BATCH, STEPS = 6, 5
CONFIGS = [
    dict(orth="polar_express", normuon=True, cautious_wd=True),
    dict(orth="quintic", normuon=False, cautious_wd=False, nesterov=False),
]


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 11, (BATCH, 4), generator=gen), torch.randint(0, 7, (BATCH, 4), generator=gen)


def _train(config, steps, rank=0, world=1, model=None, opt=None, start=0, early=False, overlap=False, **opt_kw):
    """Train the toy model; each rank takes its own slice of every batch (no DDP, the optimizer averages).
    `early`: the reductions are launched before step() (as train_step does), and on odd steps one launch
    is discarded first (a skipped non-finite step) and launched again. `overlap`: backward starts them."""
    model = model or ToyModel()
    opt = opt or build_optimizer(model, weight_decay=0.2, orth_dtype=torch.float32, shard_min_numel=0, **config,
                                 **opt_kw)
    for step in range(start, steps):
        for group in opt.param_groups:  # a schedule: lr, momentum and weight decay change every step
            group["lr"] = group["initial_lr"] * (1.0 - 0.15 * step)
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.03 * step
                group["weight_decay"] = 0.2 * (1.0 - step / STEPS)
        idx, targets = _batch(step)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        if overlap:
            opt.overlap_backward()
        model.loss(idx[rows], targets[rows]).backward()
        if early:
            if step % 2:
                opt.launch_reductions()
                opt.discard_reductions()
            opt.launch_reductions()
        opt.step()
        model.zero_grad(set_to_none=True)
    return model, opt


def _roundtrip(config, split, rank=0, world=1, **opt_kw):
    """Train `split` steps, save the optimizer through bytes, continue in a fresh optimizer."""
    model, opt = _train(config, split, rank, world, **opt_kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    fresh = ToyModel(seed=123)  # different weights, overwritten below
    fresh.load_state_dict(model.state_dict())
    fresh_opt = build_optimizer(fresh, orth_dtype=torch.float32, shard_min_numel=0, **config, **opt_kw)
    buf.seek(0)
    fresh_opt.load_state_dict(torch.load(buf))
    return _train(config, STEPS, rank, world, fresh, fresh_opt, start=split)[0]


@pytest.mark.parametrize("config", CONFIGS)
def test_state_roundtrip_continues_identically(config):
    straight, _ = _train(config, STEPS)
    resumed = _roundtrip(config, split=2)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_load_refuses_other_world_size_and_other_models():
    _, opt = _train(CONFIGS[0], 1)
    sd = opt.state_dict()
    assert sd["world_size"] == 1 and sd["rank"] == 0
    bad = dict(sd, world_size=4, rank=2)
    with pytest.raises(ValueError, match="written by a run with 4 ranks"):
        build_optimizer(ToyModel()).load_state_dict(bad)
    other = ToyModel()
    other.head = nn.Parameter(torch.randn(9, 8))  # a model with a different head
    with pytest.raises(ValueError, match="param group 2 does not match"):
        build_optimizer(other).load_state_dict(sd)


def test_lr_zero_freezes_params_but_advances_state():
    model, opt = _train(CONFIGS[0], 2)
    before = [p.detach().clone() for p in model.parameters()]
    steps_before = opt.state[model.emb]["step"]
    momentum_before = opt.state[model.up]["momentum_buffer"].clone()
    for group in opt.param_groups:
        group["lr"] = 0.0  # weight decay is lr * wd, so it stops too
    idx, targets = _batch(7)
    model.loss(idx, targets).backward()
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert opt.state[model.emb]["step"] == steps_before + 1
    assert not torch.equal(opt.state[model.up]["momentum_buffer"], momentum_before)


def test_lr_scales_the_muon_step_linearly():
    p0, grad = torch.randn(8, 16), torch.randn(8, 16)
    d1, _ = _one_muon_step(p0, grad, lr=0.01)
    d3, _ = _one_muon_step(p0, grad, lr=0.03)
    torch.testing.assert_close(d3, 3 * d1, rtol=1e-4, atol=1e-6)  # p0 + d rounds at ~1e-7


def test_build_optimizer_groups_and_errors():
    model = ToyModel()
    opt = build_optimizer(model, matrix_lr=0.03, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.4,
                          weight_decay=0.1, adam_betas=(0.7, 0.9))
    kinds = [(g["kind"], g["lr"], g["initial_lr"], g["weight_decay"]) for g in opt.param_groups]
    assert kinds == [("muon", 0.03, 0.03, 0.1), ("adamw", 0.2, 0.2, 0.0), ("adamw", 0.004, 0.004, 0.0),
                     ("adamw", 0.4, 0.4, 0.0)]
    assert opt.param_groups[0]["momentum"] == 0.95 and opt.param_groups[0]["beta2"] == 0.9
    assert all(g["betas"] == (0.7, 0.9) and g["eps"] == 1e-10 for g in opt.param_groups[1:])
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="leaves out parameters of shapes \\[\\(3,\\)\\]"):
        build_optimizer(model)
    with pytest.raises(ValueError, match="Muon groups take 2-D matrices only"):
        MuonAdamW([dict(kind="muon", params=[nn.Parameter(torch.zeros(2, 2, 2))], lr=0.1)])
    with pytest.raises(ValueError, match="kind='muon' or kind='adamw'"):
        MuonAdamW([dict(params=[nn.Parameter(torch.zeros(2))], lr=0.1)])


# ---------------------------------------------------------------------------------------------
# multi-process gloo: W ranks on slices of the batch == one process on the whole batch


def _dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for i, config in enumerate(CONFIGS):  # (bucket_bytes=1: one matrix per rank per bucket)
            model, opt = _train(config, STEPS, rank, world, bucket_bytes=1)
            results[f"params{i}"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            results[f"state{i}"] = opt.state_dict()
        params = lambda m: {n: p.detach().clone() for n, p in m.named_parameters()}  # noqa: E731
        results["early0"] = params(_train(CONFIGS[0], STEPS, rank, world, early=True, bucket_bytes=1)[0])
        # reductions started from backward's gradient hooks; the embedding's gradient comes last, so
        # when it arrives the LM head's and the matrices' reductions are already in flight
        model = ToyModel()
        opt = build_optimizer(model, weight_decay=0.2, orth_dtype=torch.float32, shard_min_numel=0, **CONFIGS[0],
                              bucket_bytes=1)
        started = []
        model.emb.register_hook(lambda g: started.append(opt.reductions_started))
        results["overlap0"] = params(_train(CONFIGS[0], STEPS, rank, world, model=model, opt=opt, overlap=True)[0])
        results["overlap_started"], results["overlap_stats"] = started, opt.overlap_stats
        results["overlap_early0"] = params(_train(CONFIGS[0], STEPS, rank, world, overlap=True, early=True,
                                                  bucket_bytes=1)[0])
        # the default buckets (here one per stack: tiny matrices), with and without overlap
        results["one_bucket0"] = params(_train(CONFIGS[0], STEPS, rank, world)[0])
        results["one_bucket_overlap0"] = params(_train(CONFIGS[0], STEPS, rank, world, overlap=True)[0])
        bf16, _ = _train(CONFIGS[0], STEPS, rank, world, overlap=True, reduce_dtype=torch.bfloat16, bucket_bytes=1)
        results["bf16_0"] = params(bf16)
        resumed = _roundtrip(CONFIGS[0], 2, rank, world, bucket_bytes=1)
        results["resumed0"] = {n: p.detach().clone() for n, p in resumed.named_parameters()}
        # elastic: this run's state after 2 steps (merged later into one process), and the single-process
        # state after 2 steps cut into this world size's shards, then trained on to the end
        two_steps = _train(CONFIGS[0], 2, rank, world, bucket_bytes=1)[1]
        results["two_steps"] = two_steps.state_dict()
        old = _contiguous_cut(results["two_steps"], rank, world)
        with pytest.raises(LayoutChanged, match="merge the ranks' states first"):
            two_steps.load_state_dict(old)  # an older per-rank cut: only through merge_rank_states
        results["two_steps_old_cut"] = old
        single = torch.load(f"{out_dir}/single_two_steps.pt")
        model = ToyModel(seed=123)
        model.load_state_dict(single["model"])
        opt = build_optimizer(model, orth_dtype=torch.float32, shard_min_numel=0, **CONFIGS[0], bucket_bytes=1)
        opt.load_state_dict(single["optim"])
        results["from_single"] = {n: p.detach().clone()
                                  for n, p in _train(CONFIGS[0], STEPS, rank, world, model, opt, start=2)[0].named_parameters()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _api_worker(rank, world, port, out_dir):
    """The same training through each collective API: `single` (torch >= 2.13's reduce_scatter_single /
    all_gather_single) and `tensor` (reduce_scatter_tensor / all_gather_into_tensor, the only ones torch 2.11
    has, which the GPU machines run); records which functions each run called."""
    import warnings

    from nanochat import optim

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the old names are deprecated in torch 2.13
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    names = ("reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor", "all_gather_into_tensor")
    real = {n: getattr(dist, n) for n in names}
    called = []

    def spy(name):
        def call(*args, **kwargs):
            called.append(name)
            return real[name](*args, **kwargs)
        return call

    try:
        for n in names:
            setattr(dist, n, spy(n))
        results = {}
        for api in ("single", "tensor"):
            optim.COLLECTIVE_API = api
            called.clear()
            model, _ = _train(CONFIGS[0], STEPS, rank, world, overlap=True, bucket_bytes=1)
            results[api] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                            "called": sorted(set(called))}
        torch.save(results, f"{out_dir}/api_rank{rank}.pt")
    finally:
        optim.COLLECTIVE_API = "auto"
        for n in names:
            setattr(dist, n, real[n])
        dist.destroy_process_group()


def test_both_collective_apis_train_identically(tmp_path):
    mp.spawn(_api_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"api_rank{rank}.pt")
        assert res["single"]["called"] == ["all_gather_single", "reduce_scatter_single"]
        assert res["tensor"]["called"] == ["all_gather_into_tensor", "reduce_scatter_tensor"]
        for name, p in res["single"]["params"].items():
            assert torch.equal(p, res["tensor"]["params"][name]), name


@pytest.mark.parametrize("n,W", [(5, 2), (8, 2), (12, 3), (7, 4), (20, 8), (1, 3)])
def test_bucket_cut_of_a_stack_and_its_inverse(n, W):
    """Every (K, W, m) cut of a Muon stack: rank r's slot s holds matrix index(r, s); owned() lists them in
    slot order with the padding last; the per-rank cuts put back together give the stack again."""
    from nanochat.optim import _concat_states, _MuonStack, _stack_shard

    K = -(-n // W)
    full = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 3).clone()
    for m in [d for d in range(1, K + 1) if K % d == 0]:
        stack = _MuonStack([nn.Parameter(full[i].clone()) for i in range(n)], per_rank=K, shape=(2, 3), world=W,
                           group=m)
        shards = [_stack_shard(full, K, W, m, r) for r in range(W)]
        seen = []
        for r, shard in enumerate(shards):
            for slot in range(K):
                i = stack.index(r, slot)
                assert float(shard[slot, 0, 0]) == (i if i < n else 0.0)  # padding is zero
                seen.append(i)
            owned = stack.owned(r)
            assert [int(p[0, 0]) for p in owned] == [i for i in (stack.index(r, s) for s in range(K)) if i < n]
        assert sorted(seen) == list(range(K * W))  # each slot once
        if m == 1 and W > 1:  # one matrix per rank per bucket: rank r holds r, W + r, ...
            assert [stack.index(0, s) for s in range(K)] == list(range(0, K * W, W))
        if m == K:  # one bucket: the contiguous cut of older nanochat
            assert [stack.index(1 % W, s) for s in range(K)] == [(1 % W) * K + s for s in range(K)]
        merged = _concat_states([{"momentum_buffer": sh} for sh in shards], limit=n, group=m)
        assert torch.equal(merged["momentum_buffer"], full)


def test_bucket_sizes_follow_bucket_bytes():
    opt = build_optimizer(ToyModel(), bucket_bytes=1)
    opt.world_size = 2  # (the plan is a pure function of the world size; nothing is communicated here)
    stacks = [u for units in opt._build_plan() for u in units if hasattr(u, "group")]
    assert [(u.per_rank, u.group) for u in stacks][-1] == (3, 1)  # the five (3, 5) matrices
    opt.bucket_bytes = 2 * 2 * 3 * 5 * 4  # two ranks x two fp32 (3, 5) matrices: K = 3 has no divisor 2
    assert [u.group for units in opt._build_plan() for u in units if hasattr(u, "group")][-1] == 1
    opt.bucket_bytes = 64 * 2**20
    assert [u.group for units in opt._build_plan() for u in units if hasattr(u, "group")][-1] == 3


def _contiguous_cut(state, rank, world):
    """This rank's state as the older nanochat cut its Muon stacks (rank r owning rows [r*K, (r+1)*K)), from
    the unsharded state of the same run (gathered here from every rank through the process group)."""
    states = [None] * world
    dist.all_gather_object(states, state)
    merged = merge_rank_states(states)
    out = copy.deepcopy(state)
    for gi, group in enumerate(out["layout"]):
        for ui, lay in enumerate(group):
            if "n" in lay:
                K = lay["per_rank"]
                del lay["group"]
                for k, v in merged["state"][gi][ui].items():
                    if torch.is_tensor(v) and v.ndim >= 1:
                        padded = torch.cat([v, v.new_zeros((K * world - v.shape[0], *v.shape[1:]))])
                        out["state"][gi][ui][k] = padded[rank * K:(rank + 1) * K].clone()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_single_process(world, tmp_path):
    model, opt = _train(CONFIGS[0], 2)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "single_two_steps.pt")
    mp.spawn(_dist_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for i, config in enumerate(CONFIGS):
        single, single_opt = _train(config, STEPS)
        for name, p in single.named_parameters():
            for r, res in enumerate(ranks):
                torch.testing.assert_close(res[f"params{i}"][name], p.detach(), rtol=1e-5, atol=1e-5,
                                           msg=lambda m, i=i, r=r, name=name: f"config {i}, rank {r}, {name}: {m}")
    # Muon and Adam updates are blind to the gradient's scale, the state is not: it must hold the
    # mean gradient's momentum, sliced by rank. The 5 (3, 5) matrices: ceil(5 / W) per rank, zero-padded,
    # rank r holding matrices r, W + r, ... (buckets of one matrix per rank)
    single_state = single_opt.state_dict()["state"]
    per_rank = -(-5 // world)
    mats_momentum = single_state[0][4]["momentum_buffer"]  # units: (16,8), (8,16), (8,8), (8,5), (3,5)
    padded = torch.cat([mats_momentum, torch.zeros(per_rank * world - 5, 3, 5)])
    emb2_avg = single_state[1][1]["exp_avg"]
    for r, res in enumerate(ranks):
        state = res[f"state{len(CONFIGS) - 1}"]["state"]
        torch.testing.assert_close(state[0][4]["momentum_buffer"], padded.view(per_rank, world, 3, 5)[:, r],
                                   rtol=1e-5, atol=1e-7)
        n = 12 // world
        torch.testing.assert_close(state[1][1]["exp_avg"], emb2_avg[r * n:(r + 1) * n], rtol=1e-5, atol=1e-7)
    for name, p in ranks[0]["params0"].items():  # resuming from per-rank state changes nothing
        for res in ranks:
            assert torch.equal(res["resumed0"][name], p), name
            assert torch.equal(res["early0"][name], p), name  # nor do reductions launched before step()
            assert torch.equal(res["overlap0"][name], p), name  # nor reductions launched during backward
            assert torch.equal(res["overlap_early0"][name], p), name
            assert torch.equal(res["one_bucket_overlap0"][name], res["one_bucket0"][name]), name
            # other buckets: other slots in the batched orthogonalisation, the same math up to rounding
            torch.testing.assert_close(res["one_bucket0"][name], p, rtol=1e-5, atol=1e-6)
            # bf16 reductions: the sums are rounded to bf16 (8 bits), the update math stays fp32
            torch.testing.assert_close(res["bf16_0"][name], p, rtol=0.05, atol=0.02)
    assert any(not torch.equal(res["bf16_0"][name], p) for name, p in ranks[0]["params0"].items())
    for res in ranks:
        # every step after the first launches everything during backward (in the order rank 0 saw), most
        # of it before the last gradient (the embedding's) is computed
        assert res["overlap_stats"] == {"in_backward": res["overlap_stats"]["total"],
                                        "total": res["overlap_stats"]["total"]}
        assert all(n > 0 for n in res["overlap_started"]) and res["overlap_started"][-1] >= 5, res["overlap_started"]
    assert all(res["state0"]["world_size"] == world and res["state0"]["rank"] == r for r, res in enumerate(ranks))
    # the odd 11-row embedding has its AdamW state on exactly one rank, the 12-row one on all (sharded)
    emb_states = [res["state0"]["state"][1] for res in ranks]
    assert sum(bool(s[0]) for s in emb_states) == 1
    assert all(s[1]["exp_avg"].shape == (12 // world, 8) for s in emb_states)
    # elastic resume: 1 process -> W processes, and W processes -> 1 process, continue the uninterrupted run
    straight, _ = _train(CONFIGS[0], STEPS)
    for r, res in enumerate(ranks):
        for name, p in straight.named_parameters():
            torch.testing.assert_close(res["from_single"][name], p.detach(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, r=r, name=name: f"1 -> {world} ranks, rank {r}, {name}: {m}")
    merged = merge_rank_states([res["two_steps"] for res in ranks])
    old_merged = merge_rank_states([res["two_steps_old_cut"] for res in ranks])  # an older checkpoint's cut
    for units, old_units in zip(merged["state"], old_merged["state"]):
        for unit, old_unit in zip(units, old_units, strict=True):
            assert unit.keys() == old_unit.keys() and all(torch.equal(unit[k], old_unit[k]) for k in unit
                                                          if torch.is_tensor(unit[k]))
    assert merged["world_size"] == 1 and merged["merged_from_world_size"] == world
    single_two = torch.load(tmp_path / "single_two_steps.pt")["optim"]
    for units, single_units in zip(merged["state"], single_two["state"]):
        for unit, single_unit in zip(units, single_units, strict=True):
            assert unit.keys() == single_unit.keys()
            for k, v in unit.items():
                torch.testing.assert_close(v, single_unit[k], rtol=1e-5, atol=1e-6)
    model = ToyModel(seed=123)
    model.load_state_dict(torch.load(tmp_path / "single_two_steps.pt")["model"])
    opt = build_optimizer(model, orth_dtype=torch.float32, shard_min_numel=0, **CONFIGS[0])
    opt.load_state_dict(merged)
    continued, _ = _train(CONFIGS[0], STEPS, model=model, opt=opt, start=2)
    for name, p in straight.named_parameters():
        torch.testing.assert_close(dict(continued.named_parameters())[name], p, rtol=1e-5, atol=1e-5)


def test_step_reads_no_tensor_value_on_the_host(monkeypatch):
    """On a GPU, reading a tensor's value on the host (.item(), .tolist(), float(t), if t: ...) or making a
    tensor from a Python number (torch.tensor(x, device=cuda)) waits for the device. The CPU analogue:
    every such call is made to fail inside step(), which must not need any (schedules change lr, weight
    decay and momentum between steps, which enter as plain floats or refilled device scalars)."""
    model, opt = _train(CONFIGS[0], 1)  # state exists
    idx, targets = _batch(1)
    model.loss(idx, targets).backward()
    for group in opt.param_groups:
        group["lr"] *= 0.5

    def host_read(*args, **kwargs):
        raise AssertionError("step() read a tensor on the host / made one from a Python number")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch, "tensor", host_read)
    opt.step()
    monkeypatch.undo()
    assert opt.state[model.emb]["step"] == 2


def test_trains_the_real_gpt():
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                       value_embeds=True, resid_scalars=True)
    model = GPT(config)
    model.init_weights()
    opt = build_optimizer(model, matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.01, scalar_lr=0.01,
                          weight_decay=0.1, orth_dtype=torch.float32)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    idx = torch.randint(0, 100, (4, 17))
    losses = []
    for _ in range(8):  # memorise one batch
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses

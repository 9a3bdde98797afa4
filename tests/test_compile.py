"""torch.compile of the training step, on CPU with dynamo's cheap backends (seconds, no Inductor):

- the model's forward + backward compiles as one graph (fullgraph=True) for the default, the record
  (SSSL + value embeddings + residual scalars) and the GQA configurations;
- the fused loss stays outside the graph (one break, at the head), instead of unrolling its chunks;
- train and eval shapes compile a bounded number of graphs, and repeating them compiles nothing new;
- the compiled Muon tail (optim.muon_tail) equals the eager float path and does not recompile when
  the schedule changes lr / weight decay.

Inductor itself (the real CUDA compile) is covered by tests/test_cuda.py and benchmarks/gpu_bench.sh.
"""

import pytest
import torch
import torch._dynamo

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import muon_tail, normuon_scale

CONFIGS = {
    "default": dict(),
    "record": dict(n_layer=4, window_pattern="SSSL", value_embeds=True, resid_scalars=True),
    "gqa": dict(n_kv_head=1, window_pattern="SL"),
}


def build(**kw):
    base = dict(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**base, **kw}))
    model.init_weights()
    model.fused_loss = False  # the CUDA default path
    return model


class CountingBackend:
    """A dynamo backend that counts the graphs it is handed and runs them as they are (aot_eager-like cost)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_compiles_to_one_graph(name):
    torch._dynamo.reset()
    model = build(**CONFIGS[name])
    model.before_compile()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    loss = compiled(x, y)
    loss.backward()  # fullgraph=True: any graph break raises instead of splitting
    ref = build(**CONFIGS[name])(x, y)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_fused_loss_runs_outside_the_graph():
    torch._dynamo.reset()
    model = build(**CONFIGS["gqa"])
    model.fused_loss = True
    model.before_compile()
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    explanation = torch._dynamo.explain(model)(x, y)
    # the blocks form one graph; the chunked loss is skipped (not unrolled into it)
    assert explanation.graph_count == 1
    assert explanation.graph_break_count <= 1
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, build(**CONFIGS["gqa"])(x, y), atol=1e-5, rtol=1e-5)


def test_recompiles_are_bounded_for_train_and_eval_shapes():
    torch._dynamo.reset()
    model = build(**CONFIGS["record"])
    model.before_compile()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x, y = torch.randint(0, 300, (4, 32)), torch.randint(0, 300, (4, 32))
    for _ in range(3):  # training shape
        compiled(x, y).backward()
    after_train = backend.graphs
    model.eval()
    with torch.no_grad():
        for _ in range(2):  # evaluation: other batch size, per-token losses, no grad
            compiled(x[:2], y[:2], loss_reduction="none")
    model.train()
    compiled(x, y).backward()  # back to training: cached
    assert after_train == 1
    assert backend.graphs <= 3, backend.graphs


def test_compiled_muon_tail_equals_the_eager_path_without_recompiles():
    torch._dynamo.reset()
    backend = CountingBackend()
    tail = torch.compile(muon_tail, backend=backend, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for step, (lr, wd) in enumerate([(0.02, 0.1), (0.015, 0.08), (0.01, 0.0)]):
        p = torch.randn(3, 16, 8, generator=g)
        X = torch.randn(3, 16, 8, generator=g).bfloat16()
        sm = torch.rand(3, 16, 1, generator=g)
        # the eager float path of MuonAdamW._muon_update
        p_ref, sm_ref = p.clone(), sm.clone()
        Xf = normuon_scale(X.float(), sm_ref, 0.9)
        p_ref.addcmul_(p_ref, (Xf * p_ref > 0).float(), value=-lr * wd)
        p_ref.add_(Xf, alpha=-lr * 2.0)
        lr_t, wd_t = torch.tensor(lr), torch.tensor(wd)
        tail(p, X, sm, lr_t, wd_t, 2.0, 0.9, True, True)
        torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sm, sm_ref)
    assert backend.graphs == 1  # new lr / wd values are tensor inputs, not constants


def test_flex_model_compiles_to_one_graph():
    # the flex backend's Python side (mask cache, length routing) must not break the graph; CPU has no
    # flex backward, so this checks the forward (the CUDA step with backward is in tests/test_cuda.py)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=4, n_head=2, n_kv_head=1, n_embd=32,
                          window_pattern="SSSL", value_embeds=True, resid_scalars=True), attention="flex")
    model.init_weights()
    with torch.no_grad():  # non-zero output projections: attention reaches the logits
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.05)
    model.before_compile()
    assert model.attention_backend.startswith("flex")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_compiled_blocks_share_graphs_and_finish_late_gradients_early():
    """Regional compilation (--compile-scope blocks): same-shaped blocks reuse their graphs, the loss and
    gradients equal eager's, evaluation stays eager, and the last block's gradients are final before
    backward reaches the first block (what lets the optimizer's reductions overlap backward)."""
    torch._dynamo.reset()
    model = build(**CONFIGS["record"])  # 4 layers: windows S, S, S, L; value embeddings on some layers
    backend = CountingBackend()
    assert model.compile_blocks(backend=backend, dynamic=False) is model
    events = []
    model.blocks[-1].mlp.c_fc.weight.register_post_accumulate_grad_hook(lambda p: events.append("last block"))

    def on_first_block(module, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: events.append("first block's output"))

    model.blocks[0].register_forward_hook(on_first_block)
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    for _ in range(2):
        events.clear()
        loss = model(x, y)
        loss.backward()
    assert events == ["last block", "first block's output"]
    assert 1 <= backend.graphs <= 3, backend.graphs  # (S or L window) x (value embedding or not), not 4
    ref = build(**CONFIGS["record"])
    ref_loss = ref(x, y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, 2 * q.grad, atol=1e-5, rtol=1e-4, msg=name)  # two backwards
    graphs = backend.graphs
    with torch.no_grad():
        model(x[:1], y[:1], loss_reduction="none")  # another shape, no grad: eager, nothing compiled
    assert backend.graphs == graphs
    assert not any("_orig_mod" in k for k in model.state_dict())


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_gradient_hooks_added_after_the_first_step_do_not_recompile(scope):
    # MuonAdamW.overlap_backward registers post-accumulate-grad hooks on every parameter at the first
    # distributed step, after the model has compiled: that must not cost a second compilation
    torch._dynamo.reset()
    model = build(**CONFIGS["record"])
    backend = CountingBackend()
    if scope == "blocks":
        run = model.compile_blocks(backend=backend, dynamic=False)
    else:
        model.before_compile()
        run = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    run(x, y).backward()
    graphs = backend.graphs
    fired = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    for _ in range(2):
        run(x, y).backward()
    assert backend.graphs == graphs
    assert len(fired) == 2 * len(list(model.parameters()))

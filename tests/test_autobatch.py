"""--device-batch-size auto (nanochat/autobatch.py): candidates, the halving probe, the CPU answer.

The probe is exercised with a real memory budget: `try_size` allocates real tensors and a size
"fits" when its allocation stays under a byte budget, which is how the GPU probe decides through
torch.cuda.max_memory_allocated. The CUDA probe itself runs in tests/test_cuda.py.
"""

import pytest
import torch

from nanochat.autobatch import (candidate_batch_sizes, find_device_batch_size, oom_message, optimizer_state_bytes,
                                probe)
from nanochat.gpt import GPT, GPTConfig


def test_candidates_divide_the_rows_per_rank_largest_first():
    assert candidate_batch_sizes(524288, 2048, 8) == [32, 16, 8, 4, 2, 1]  # 32 rows per rank
    assert candidate_batch_sizes(524288, 2048, 1, max_size=64) == [64, 32, 16, 8, 4, 2, 1]
    assert candidate_batch_sizes(3 * 2048, 2048, 1) == [1]  # 3 rows: only 1 divides among powers of 2
    assert candidate_batch_sizes(12 * 64, 64, 1) == [4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        candidate_batch_sizes(1000, 64, 1)


def test_probe_halves_until_the_allocation_fits():
    budget = 10 * 2**20  # bytes
    peak = {}
    tried = []

    def try_size(b):
        tried.append(b)
        t = torch.empty(b * 2**20 // 4, dtype=torch.float32)  # b MiB
        peak["bytes"] = t.numel() * t.element_size()
        if peak["bytes"] > 4 * budget:  # far over: the allocator would have raised
            raise torch.OutOfMemoryError("CUDA out of memory (test budget)")

    logs = []
    choice = probe(try_size, [64, 32, 16, 8, 4], fits=lambda: peak["bytes"] <= budget, log=logs.append)
    assert choice == 8 and tried == [64, 32, 16, 8]
    assert logs[-1] == "device batch size probe: 8 fits"
    assert "64 does not fit" in logs[0]


def test_probe_names_what_to_do_when_nothing_fits():
    def try_size(b):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError, match="even --device-batch-size 1 does not fit.*--depth"):
        probe(try_size, [2, 1], log=lambda s: None)


def test_oom_message_names_the_flag_and_the_size_that_fits():
    msg = oom_message(32, 2048, fits=16, where="step 7")
    assert msg.startswith("CUDA out of memory at step 7 with --device-batch-size=32 (x 2048 tokens)")
    assert "--device-batch-size 16 fits" in msg
    assert "--total-batch-size" in msg
    assert "--device-batch-size auto" in oom_message(32, 2048)


def test_cpu_returns_the_default_without_probing():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    calls = []

    def train_model(x, y):
        calls.append(x.shape)
        return model(x, y)

    logs = []
    assert find_device_batch_size(model, train_model, 64, 300, 64 * 64, log=logs.append) == 32
    assert find_device_batch_size(model, train_model, 64, 300, 12 * 64, log=logs.append) == 4  # divides 12 rows
    assert calls == [] and "no probe on cpu" in logs[0]


def test_optimizer_reserve_counts_every_parameter_twice_in_fp32():
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                       value_embeds=True, resid_scalars=True)
    model = GPT(config)
    assert optimizer_state_bytes(model) == 8 * sum(p.numel() for p in model.parameters())


SYNTH = ["--synthetic-data", "--vocab-size", "300", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32",
         "--max-seq-len", "32", "--total-batch-size", "384", "--num-iterations", "2", "--warmup-steps", "1",
         "--weight-decay", "0", "--device-type", "cpu"]


def test_cli_auto_batch_keeps_the_total_batch(base_dir, capsys):
    import json
    import re

    from scripts.base_train import main

    assert main(SYNTH + ["--device-batch-size", "auto", "--model-tag", "auto"]) == 0
    out = capsys.readouterr().out
    assert "--device-batch-size auto: 4 (no probe on cpu; 12 rows per rank per step)" in out
    assert re.search(r"tokens per step +384 = 4 x 32 x 1 ranks x 3 accumulation", out), out
    info = json.loads((base_dir / "base_checkpoints" / "auto" / "run.json").read_text())
    assert info["args"]["device_batch_size"] == 4  # the resolved size (a resume probes again)
    assert main(SYNTH + ["--device-batch-size", "auto", "--model-tag", "auto", "--num-iterations", "3",
                         "--resume", "latest"]) == 0
    with pytest.raises(SystemExit):
        main(SYNTH + ["--device-batch-size", "many"])


class _CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_probe_inputs_are_laid_out_as_the_loaders_so_training_compiles_nothing_new():
    """The probe runs the compiled training model; if its inputs differ from the loaders' in strides, storage
    offset or aliasing, the first training batch compiles the model once more (minutes at depth 20). The
    probe's batch and the synthetic loader's share the DataLoader's layout (two halves of one (2, B, T)
    buffer), and a model compiled on the probe's batch takes the loader's without a new graph."""
    import torch._dynamo

    from nanochat.autobatch import probe_batch
    from nanochat.train_loop import SyntheticLoader

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    model.init_weights()
    model.fused_loss = False
    model.before_compile()
    backend = _CountingBackend()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    px, py = probe_batch(4, 16, 64, "cpu")
    lx, ly = next(SyntheticLoader(64, 4, 16, 1, "cpu"))
    for x, y in ((px, py), (lx, ly)):
        assert x.shape == y.shape == (4, 16) and x.stride() == y.stride() == (16, 1)
        assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        assert (x.storage_offset(), y.storage_offset()) == (0, 4 * 16)
    compiled(px, py).backward()
    graphs = backend.graphs
    compiled(lx, ly).backward()
    assert backend.graphs == graphs, "the first training batch recompiled the model"
    compiled(lx, lx).backward()  # the probe as it was: one tensor for inputs and targets
    assert backend.graphs > graphs, "aliasing is guarded: the old probe's batch was a different graph"

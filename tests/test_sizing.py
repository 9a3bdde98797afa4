"""The depth dial (nanochat/sizing.py) against REFERENCE.md section 2 and hand-computed values."""

import math

import pytest
import torch

from nanochat import sizing
from nanochat.gpt import GPT


@pytest.mark.parametrize("depth,width,heads", [(1, 128, 1), (4, 256, 2), (6, 384, 3), (12, 768, 6), (20, 1280, 10),
                                               (26, 1664, 13), (32, 2048, 16)])
def test_width_is_depth_times_64_rounded_up_to_head_dim(depth, width, heads):
    c = sizing.model_config(depth)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (width, heads, heads, depth)
    assert (c.sequence_len, c.vocab_size, c.padded_vocab_size) == (2048, 32768, 32768)


def test_d12_parameter_counts_by_hand():
    # per layer: q, k, v, proj = 4 C^2, MLP 4C wide = 8 C^2 -> 12 C^2; C = 768, V = 32768
    C, L, V = 768, 12, 32768
    matrices, head, embedding = L * 12 * C * C, V * C, V * C
    p = sizing.count_params(sizing.model_config(12))
    assert p == {"total": matrices + head + embedding, "scaling": matrices + head, "embedding": embedding, "scalar": 0}
    assert p["scaling"] == 110_100_480 and p["total"] == 135_266_304


@pytest.mark.parametrize("kwargs", [{"depth": 12}, {"depth": 4, "n_kv_head": 1, "window_pattern": "SSSL"},
                                    {"depth": 3, "value_embeds": True, "resid_scalars": True, "vocab_size": 1000},
                                    {"depth": 5, "aspect_ratio": 96, "head_dim": 64, "value_embeds": True,
                                     "n_kv_head": 2}])
def test_closed_form_counts_equal_the_instantiated_model(kwargs):
    config = sizing.model_config(**kwargs)
    with torch.device("meta"):
        model = GPT(config)
    assert sizing.count_params(config) == model.num_params()


def test_flops_per_token_by_hand():
    # 6 x scaling params + 12 * H * D * context per layer (full context on every layer for pattern "L")
    c = sizing.model_config(12)
    assert sizing.flops_per_token(c) == 6 * 110_100_480 + 12 * 12 * 768 * 2048
    # sliding window "SSSL" at depth 4: three layers see T/4, the last sees T
    c = sizing.model_config(4, max_seq_len=1024, window_pattern="SSSL")
    attn = 12 * 256 * (3 * 256 + 1024)
    assert sizing.flops_per_token(c) == 6 * sizing.count_params(c)["scaling"] + attn


def test_reference_tokens_is_ratio_times_d12_scaling_params():
    assert sizing.reference_tokens(sizing.model_config(20), 10.5) == pytest.approx(10.5 * 110_100_480)


@pytest.mark.parametrize("depth,batch_log2", [(8, 18), (10, 19), (12, 19), (14, 19), (16, 19), (18, 20), (20, 20),
                                              (22, 20), (24, 20), (26, 20), (32, 21)])
def test_auto_batch_matches_the_observed_optimum(depth, batch_log2):
    # REFERENCE s2: d8 2^18; d10-d16 2^19; d18-d26 2^20; d32+ 2^21 (at the compute-optimal ratio)
    c = sizing.model_config(depth)
    ratio = sizing.COMPUTE_OPTIMAL_RATIO
    tokens = ratio * sizing.count_params(c)["scaling"]
    assert sizing.auto_total_batch_size(tokens, sizing.reference_tokens(c, ratio)) == 2 ** batch_log2


def test_auto_batch_formula_by_hand():
    # d8: D/D_ref = 41,943,040 / 110,100,480; 2^19 * 0.381^0.383 = 2^18.47 -> 2^18
    ratio = 41_943_040 / 110_100_480
    assert 19 + 0.383 * math.log2(ratio) == pytest.approx(18.467, abs=1e-3)
    assert sizing.auto_total_batch_size(41_943_040, 110_100_480) == 2 ** 18
    assert sizing.auto_total_batch_size(1.0, 1.0) == 2 ** 19


def test_learning_rates_scale_with_batch_and_width():
    assert sizing.learning_rates(2 ** 19, 768) == pytest.approx(
        {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5})
    lr = sizing.learning_rates(2 ** 20, 1280)  # sqrt(2) for the batch, sqrt(768/1280) for the AdamW width
    assert lr["matrix_lr"] == pytest.approx(0.02 * 2 ** 0.5)
    assert lr["embedding_lr"] == pytest.approx(0.3 * 2 ** 0.5 * (768 / 1280) ** 0.5)
    assert lr["unembedding_lr"] == pytest.approx(0.008 * 2 ** 0.5 * (768 / 1280) ** 0.5)
    assert lr["scalar_lr"] == pytest.approx(0.5 * 2 ** 0.5)


def test_weight_decay_rule():
    assert sizing.weight_decay(2 ** 19, 1e9, 1e9) == pytest.approx(0.28)
    # twice the batch and twice the tokens: 0.28 * sqrt(2) / 2
    assert sizing.weight_decay(2 ** 20, 2e9, 1e9) == pytest.approx(0.28 * 2 ** 0.5 / 2)


def test_horizon_precedence_iterations_then_flops_then_ratio():
    B, N, F = 2 ** 19, 110_100_480, 887_095_296.0
    assert sizing.resolve_horizon(B, N, F, num_iterations=7, target_flops=1e18) == (7, "--num-iterations=7")
    steps, source = sizing.resolve_horizon(B, N, F, target_flops=1e18, target_param_data_ratio=20)
    assert steps == round(1e18 / (F * B)) == 2150 and "target-flops" in source
    steps, _ = sizing.resolve_horizon(B, N, F, target_param_data_ratio=20)
    assert steps == round(20 * N / B) == 4200
    steps, _ = sizing.resolve_horizon(B, N, F)  # default ratio
    assert steps == round(sizing.COMPUTE_OPTIMAL_RATIO * N / B) == 2205


def test_grad_accum_steps_and_its_error():
    assert sizing.grad_accum_steps(2 ** 19, 32, 2048, 8) == 1
    assert sizing.grad_accum_steps(2 ** 19, 16, 2048, 1) == 16
    assert sizing.grad_accum_steps(2 ** 20, 16, 2048, 8) == 4
    with pytest.raises(ValueError, match=r"--total-batch-size=1000 .* 4 x 64 x 2 = 512.*--total-batch-size=1024"):
        sizing.grad_accum_steps(1000, 4, 64, 2)


def test_lr_schedule_by_hand():
    # 100 steps, warmup 10, warmdown over the last 50 to 5%
    values = [sizing.lr_multiplier(s, 100, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.05)
              for s in (0, 9, 10, 50, 51, 75, 99, 100)]
    assert values == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.98 + 0.02 * 0.05, 0.525, 0.02 + 0.98 * 0.05, 0.05])
    # reference defaults: warmup 40 then 65% warmdown
    assert sizing.lr_multiplier(0, 1000) == pytest.approx(1 / 40)
    assert sizing.lr_multiplier(350, 1000) == 1.0
    assert sizing.lr_multiplier(675, 1000) == pytest.approx(0.5 + 0.5 * 0.05)


def test_momentum_and_weight_decay_schedules():
    assert [sizing.muon_momentum(s) for s in (0, 150, 300, 5000)] == pytest.approx([0.85, 0.91, 0.97, 0.97])
    wd = [sizing.weight_decay_multiplier(s, 100) for s in (0, 50, 100, 200)]
    assert wd == pytest.approx([1, 0.5, 0, 0], abs=1e-12)


def test_bad_dial_values_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        sizing.model_config(0)
    with pytest.raises(ValueError, match="--n-kv-head=4"):
        sizing.model_config(6, n_kv_head=4)  # 3 heads

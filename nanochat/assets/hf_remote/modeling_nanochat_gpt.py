"""A nanochat GPT for transformers (remote code): the same math as nanochat/gpt.py, torch only.

- token embedding -> parameter-free RMSNorm -> blocks -> RMSNorm -> untied LM head, no biases
- attention: rotary (base `rope_theta`, pairs = first/second half of each head), then RMSNorm of q
  and k times `qk_gain`, SDPA with scale 1/sqrt(head_dim); grouped-query heads; per-layer windows
  (a query sees the last `window` positions, itself included)
- optional value embeddings mixed into v through a sigmoid gate (ResFormer), optional per-layer
  residual and x0 scalars
- ReLU^2 MLP; logits soft-capped `cap * tanh(z / cap)` in fp32; the head has padded rows which are
  cut off (`logits[..., :vocab_size]`)

Generation: `GenerationMixin` with transformers' DynamicCache; short-window layers are sliding-window
cache layers (they keep only the keys their window can still reach). Positions come from the 2-D
attention mask, so left-padded batches generate what each prompt gives alone.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat_gpt import NanoChatGPTConfig

try:
    from transformers import initialization as init
except ImportError:  # transformers < 5
    init = nn.init


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); cos/sin: (B, T, 1, D/2)
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class NanoChatGPTAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                      config.head_dim)
        self.qk_gain = config.qk_gain
        self.window = config.window_sizes[layer_idx]
        self.ve_gate_channels = config.ve_gate_channels
        C = config.hidden_size
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        has_ve = layer_idx in config.value_embed_layers
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, positions, cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, K)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q) * self.qk_gain, rms_norm(k) * self.qk_gain
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, K, S, D): what this layer's cache still holds
        mask = positions.mask(k.size(2), self.window)  # (B, 1, T, S) or None
        gqa = self.n_head != self.n_kv_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanoChatGPTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanoChatGPTBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = NanoChatGPTAttention(config, layer_idx)
        self.mlp = NanoChatGPTMLP(config)

    def forward(self, x, ve, cos, sin, positions, cache):
        x = x + self.attn(rms_norm(x), ve, cos, sin, positions, cache)
        return x + self.mlp(rms_norm(x))


class _Positions:
    """Absolute positions of the queries and of every key seen so far, from the 2-D attention mask.

    A padded slot has no position; a query sees key j when j is a real token, j's position is not
    after its own and is within the window. A padding query sees itself only (its output is unused,
    but must stay finite: NaN values would leak into real rows through 0 * NaN)."""

    def __init__(self, attention_mask, position_ids, past, T, B, device):
        total = past + T
        if attention_mask is None:
            valid = torch.ones(B, total, dtype=torch.bool, device=device)
            key_pos = torch.arange(total, device=device).expand(B, total)
            if position_ids is not None and past == 0:
                key_pos = position_ids.to(device).expand(B, total)
        else:
            if attention_mask.dim() != 2 or attention_mask.size(-1) != total:
                raise ValueError(f"attention_mask must be 2-D (batch, {total} = cached + new tokens); got shape "
                                 f"{tuple(attention_mask.shape)}")
            valid = attention_mask.to(device).bool()
            key_pos = valid.long().cumsum(-1) - 1
        q_pos = key_pos[:, past:] if position_ids is None else position_ids.to(device).expand(B, T)
        self.valid, self.key_pos, self.q_pos, self.T = valid, key_pos, q_pos, T
        # no padding and no explicit positions: plain causal attention is exact whenever the window
        # covers every returned key (then SDPA may use its fused kernels)
        self.unpadded = position_ids is None and (attention_mask is None or bool(valid.all()))
        self.key_idx = torch.arange(total, device=device)
        self.q_idx = self.key_idx[past:]
        self._masks = {}

    def mask(self, S, window):
        """(B, 1, T, S) boolean mask over the last S keys (the ones the layer's cache returned), or None
        when causal attention over all of them is exact (no padding, window >= S, and T == S or T == 1)."""
        if self.unpadded and window >= S and (self.T == S or self.T == 1):
            return None
        if (S, window) not in self._masks:
            kp, kv, ki = self.key_pos[:, None, -S:], self.valid[:, None, -S:], self.key_idx[None, None, -S:]
            qp, qi = self.q_pos[:, :, None], self.q_idx[None, :, None]
            m = kv & (kp <= qp) & (qp - kp < window) | (ki == qi)
            self._masks[(S, window)] = m[:, None]
        return self._masks[(S, window)]


class NanoChatGPTPreTrainedModel(PreTrainedModel):
    config_class = NanoChatGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NanoChatGPTBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        # only for weights missing from a checkpoint; nanochat's own init (zero projections) would make a
        # model whose attention does nothing, so this follows a plain small-normal init instead
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, NanoChatGPTModel) and module.resid_lambdas is not None:
            init.ones_(module.resid_lambdas)
            init.zeros_(module.x0_lambdas)


class NanoChatGPTModel(NanoChatGPTPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        V, C = config.padded_vocab_size, config.hidden_size
        kv_dim = config.num_key_value_heads * config.head_dim
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([NanoChatGPTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in config.value_embed_layers})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        else:
            self.resid_lambdas = self.x0_lambdas = None
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _rotary(self, q_pos, dtype):
        # computed per call (no buffer): transformers builds models on the meta device, where a
        # non-persistent buffer would stay uninitialised; same float32 ops as nanochat's tables
        D = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32,
                                                                  device=q_pos.device) / D))
        freqs = q_pos.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
        return freqs.cos()[:, :, None, :].to(dtype), freqs.sin()[:, :, None, :].to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        B, T = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        positions = _Positions(attention_mask, position_ids, past, T, B, input_ids.device)
        dtype = self.wte.weight.dtype
        cos, sin = self._rotary(positions.q_pos, dtype)
        x = rms_norm(self.wte(input_ids))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, positions, cache)
        return rms_norm(x), cache


class NanoChatGPTForCausalLM(NanoChatGPTPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = NanoChatGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        if input_ids is None:
            raise ValueError("NanoChatGPTForCausalLM needs input_ids (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values  # the argument's name before transformers 5.2x
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache,
                                   bool(use_cache))  # a cache only when asked (generate asks)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)[..., :self.config.vocab_size].float()  # fp32, like nanochat
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        out = {"loss": loss, "logits": logits}
        fields = CausalLMOutputWithPast.__dataclass_fields__
        out["cache" if "cache" in fields else "past_key_values"] = cache
        return CausalLMOutputWithPast(**out)

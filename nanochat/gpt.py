"""The GPT: a decoder-only transformer in the style of the 2026 speedrun baselines.

- rotary position embeddings (base 100k), QK-norm with a small gain, parameter-free RMSNorm (pre-norm
  and a final norm), ReLU^2 MLP 4x wide, untied embedding and LM head, no biases anywhere
- logits soft-capped `cap * tanh(z / cap)` in fp32 (cap 15)
- fp32 master weights, cast to the compute dtype inside every matmul (bf16 on SM80+ GPUs and on CPUs where
  the GEMM probe of nanochat.common finds bf16 faster, i.e. AMX / AVX512-BF16; fp32 elsewhere); the residual
  stream, norms, rotary and attention run in that dtype, the loss in fp32 (nanochat.lm_loss)
- options: grouped-query attention (`n_kv_head < n_head`), a sliding-window layer pattern (e.g. "SSSL":
  short window = a quarter of the context, last layer always long), value embeddings on alternate
  layers mixed into v through a sigmoid gate (ResFormer), per-layer residual and x0 scalars

Shape legend: B batch, T time (query positions), S key positions, H query heads, K kv heads,
D head dim, C model width, V (padded) vocab.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.lm_loss import linear_softcap_cross_entropy
from nanochat.model_config import VE_GATE_CHANNELS, GPTConfig
from nanochat.sizing import flops_per_token

def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the input's dtype in the matmul."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin: (1, T, 1, D/2). Rotate pairs (first half, second half).
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------
# attention kernels: Flash Attention 3 on Hopper when importable, PyTorch SDPA everywhere else


def _load_flash_attn3():
    try:
        import flash_attn_interface  # FA3 (Hopper build)

        return flash_attn_interface.flash_attn_func
    except Exception:  # not installed, or built for another GPU / torch: SDPA handles it
        return None


def attention_backend(q: torch.Tensor, allow_fa3: bool = True) -> str:
    """Which kernel `attend` will use for this query tensor: "fa3" or "sdpa"."""
    if (allow_fa3 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(q.device)[0] == 9 and _load_flash_attn3() is not None):
        return "fa3"
    return "sdpa"


def attend(q, k, v, window: int, q_offset: int = 0, allow_fa3: bool = True) -> torch.Tensor:
    """Causal (optionally sliding-window) attention.

    q: (B, T, H, D) for absolute positions q_offset .. q_offset+T-1; k, v: (B, S, K, D) for positions
    0 .. S-1 (S = q_offset + T). Returns (B, T, H, D). Query i sees keys j with j <= i and i - j < window.
    """
    T, S = q.size(1), k.size(1)
    if attention_backend(q, allow_fa3) == "fa3" and q_offset == S - T:
        fa3 = _load_flash_attn3()
        left = window - 1 if window < S else -1
        out = fa3(q, k, v, causal=True, window_size=(left, 0))
        return out[0] if isinstance(out, tuple) else out
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T|S, D)
    gqa = qh.size(1) != kh.size(1)
    needs_window = window < S
    if q_offset == 0 and T == S and not needs_window:
        y = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
    elif T == 1 and not needs_window:
        y = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=gqa)  # one query sees the whole cache
    else:
        qpos = torch.arange(q_offset, q_offset + T, device=q.device)[:, None]
        kpos = torch.arange(S, device=q.device)[None, :]
        mask = (kpos <= qpos) & (qpos - kpos < window)  # (T, S) True = attend
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_gain = config.qk_gain
        C = config.n_embd
        self.c_q = Linear(C, self.n_head * self.head_dim)
        self.c_k = Linear(C, self.n_kv_head * self.head_dim)
        self.c_v = Linear(C, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(self.n_head * self.head_dim, C)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if config.has_value_embed(layer_idx) else None

    def forward(self, x, ve, cos, sin, window, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual: gate in (0, 2), 1 at init (gate weights start at zero)
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, K)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q) * self.qk_gain, rms_norm(k) * self.qk_gain
        q_offset = 0
        if kv_cache is not None:
            q_offset = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, q_offset + T, K, D)
        y = attend(q, k, v, window, q_offset)
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache=None):
        x = x + self.attn(rms_norm(x), ve, cos, sin, window, kv_cache)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    # what callers may ask of forward (evaluators read these instead of guessing from its signature):
    # loss_reduction="none" per-token losses, positions=(rows, cols) logits at chosen positions only,
    # kv_cache= incremental decoding with a nanochat.engine.KVCache
    supports_loss_reduction = True
    supports_positions = True
    supports_kv_cache = True

    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        # training loss through nanochat.lm_loss (chunked head + soft-cap + CE, no full logits):
        # None = on CPU only; same math either way, so this is a runtime choice, not part of the config
        self.fused_loss: bool | None = None
        self.fused_loss_chunk_rows = 512
        V, C = config.padded_vocab_size, config.n_embd
        self.wte = nn.Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = Linear(C, V)
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        else:
            self.resid_lambdas = self.x0_lambdas = None
        self.windows = config.window_sizes()
        # rotary tables cover 4x the training context so that generation may run past it
        self.rotary_len = 4 * config.sequence_len
        cos, sin = self._rotary_tables(self.rotary_len, device=self.wte.weight.device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # --- construction -------------------------------------------------------------------------

    def _rotary_tables(self, length: int, device):
        D = self.config.head_dim
        if device is not None and torch.device(device).type == "meta":
            return torch.empty(1, length, 1, D // 2, device="meta"), torch.empty(1, length, 1, D // 2, device="meta")
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
        freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (call after `to_empty` when built on the meta device)."""
        C = self.config.n_embd
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            a, m = block.attn, block.mlp
            for lin in (a.c_q, a.c_k, a.c_v):
                nn.init.normal_(lin.weight, std=C ** -0.5)
            nn.init.normal_(m.c_fc.weight, std=C ** -0.5)
            nn.init.zeros_(a.c_proj.weight)  # residual branches start as identity
            nn.init.zeros_(m.c_proj.weight)
            if a.ve_gate is not None:
                nn.init.zeros_(a.ve_gate.weight)
        for emb in self.value_embeds.values():
            nn.init.normal_(emb.weight, std=0.8)
        if self.resid_lambdas is not None:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.0)
        cos, sin = self._rotary_tables(self.rotary_len, device=self.wte.weight.device)
        self.cos, self.sin = cos, sin  # buffers: rebuilt because to_empty() leaves them uninitialised

    # --- bookkeeping --------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role: Muon for block matrices, AdamW for the rest."""
        matrix, scalar = [], []
        for block in self.blocks:
            for name, p in block.named_parameters():
                (scalar if "ve_gate" in name else matrix).append(p)
        if self.resid_lambdas is not None:
            scalar += [self.resid_lambdas, self.x0_lambdas]
        groups = {"matrix": matrix, "embedding": [self.wte.weight] + [e.weight for e in self.value_embeds.values()],
                  "lm_head": [self.lm_head.weight], "scalar": scalar}
        assert sum(len(v) for v in groups.values()) == len(list(self.parameters())), "a parameter has no group"
        return groups

    def num_params(self) -> dict[str, int]:
        g = self.param_groups()
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        return {"total": sum(p.numel() for p in self.parameters()),
                "scaling": count(g["matrix"]) + count(g["lm_head"]),
                "embedding": count(g["embedding"]), "scalar": count(g["scalar"])}

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 x matmul params (block matrices + head) + attention scores/values.

        Attention: per layer 12 * H * D * (attended context), the context being the layer's window
        (capped at sequence_len) -- the convention of the reference (causal halving not applied).
        """
        return flops_per_token(self.config)

    def _use_fused_loss(self, x: torch.Tensor) -> bool:
        # auto: on CPU, where the full-logits passes cost as much as the head's matmuls; on CUDA the
        # plain path is what torch.compile fuses best (set fused_loss=True there to save logits memory)
        return x.device.type == "cpu" if self.fused_loss is None else self.fused_loss

    def get_device(self) -> torch.device:
        return self.wte.weight.device

    # --- forward ------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None, positions: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`positions=(rows, cols)` returns logits (N, vocab) at those (b, t) only: scoring a few
        continuation tokens of a long prompt (CORE) then skips the LM head everywhere else."""
        B, T = idx.shape
        if positions is not None and targets is not None:
            raise ValueError("positions= selects logits for scoring; it cannot be combined with targets")
        t0 = kv_cache.pos if kv_cache is not None else 0
        if t0 + T > self.cos.size(1):
            raise ValueError(f"sequence position {t0 + T} exceeds the rotary table ({self.cos.size(1)}): "
                             f"generate fewer tokens or raise sequence_len")
        cos, sin = self.cos[:, t0:t0 + T].to(self.compute_dtype), self.sin[:, t0:t0 + T].to(self.compute_dtype)
        x = rms_norm(self.wte(idx).to(self.compute_dtype))  # (B, T, C)
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = rms_norm(x)
        if positions is not None:
            x = x[positions[0], positions[1]]  # (N, C)
        if targets is not None and loss_reduction in ("mean", "sum") and torch.is_grad_enabled() \
                and self._use_fused_loss(x):
            return linear_softcap_cross_entropy(x, self.lm_head.weight, targets, vocab_size=self.config.vocab_size,
                                                softcap=self.config.logit_softcap, reduction=loss_reduction,
                                                chunk_rows=self.fused_loss_chunk_rows)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()  # (B, T, vocab) or (N, vocab), fp32
        cap = self.config.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be mean, sum or none, not {loss_reduction!r}")
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

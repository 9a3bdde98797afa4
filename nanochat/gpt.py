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

from nanochat.attention import Attention, resolve_attention, sdpa_attend
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

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # see Embedding.reset_parameters
            super().reset_parameters()


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        # A model is built on the meta device, then init_weights() fills it: initialising meta tensors
        # computes nothing, but torch's meta normal_ / uniform_ import torch._dynamo (~1.7 s in every
        # process that builds a model: training, each evaluation, each chat front end)
        if not self.weight.is_meta:
            super().reset_parameters()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, D); cos/sin: (1, T, 1, D/2). Rotate pairs (first half, second half).
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------
# attention kernels live in nanochat/attention.py, resolved once per model (GPT.set_attention)


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

    def forward(self, x, ve, cos, sin, window, kv_cache=None, attn: Attention | None = None):
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
            if isinstance(q_offset, torch.Tensor):  # per-row positions (SlotKVCache): SDPA with a per-row mask
                attn = None
        y = (sdpa_attend if attn is None else attn)(q, k, v, window, q_offset)  # (B, T, H, D)
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

    def forward(self, x, ve, cos, sin, window, kv_cache=None, attn: Attention | None = None):
        x = x + self.attn(rms_norm(x), ve, cos, sin, window, kv_cache, attn)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    # what callers may ask of forward (evaluators read these instead of guessing from its signature):
    # loss_reduction="none" per-token losses, positions=(rows, cols) logits at chosen positions only,
    # kv_cache= incremental decoding with a nanochat.engine.KVCache
    supports_loss_reduction = True
    supports_positions = True
    supports_kv_cache = True

    def __init__(self, config: GPTConfig, compute_dtype: torch.dtype = torch.float32, attention: str = "auto"):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        # attention kernel (nanochat/attention.py): `attention` is the request (auto|fa3|fa4|flex-fa4|flex|sdpa),
        # resolved once for the device the model runs on, by set_attention() or at the first forward
        self.attention = attention
        self._attn: Attention | None = None
        # training loss through nanochat.lm_loss (chunked head + soft-cap + CE, no full logits):
        # None = wherever the head runs eagerly (see _use_fused_loss); same math either way, so this is a
        # runtime choice, not part of the config
        self.fused_loss: bool | None = None
        self.fused_loss_chunk_rows = 512
        # loss_reduction="none" (evaluation) computes the logits in row chunks of about this many fp32
        # elements (2^26 = 256 MB): no full (B, T, V) fp32 logits (8.6 GB at depth 20, batch 32)
        self.eval_logits_chunk_elems = 2**26
        V, C = config.padded_vocab_size, config.n_embd
        self.wte = Embedding(V, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = Linear(C, V)
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({str(i): Embedding(V, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        else:
            self.resid_lambdas = self.x0_lambdas = None
        self.windows = config.window_sizes()
        self._compiled_blocks: list | None = None  # compile_blocks(); a plain list: not submodules
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
        """auto (fused_loss None): chunked wherever the head runs eagerly -- on CPU, where the full-logits
        passes cost as much as the head's matmuls, and on any device outside a compiled graph (--no-compile,
        --compile-scope blocks), where the plain path keeps several fp32 (N, V) tensors alive for backward:
        ~24-32 GiB at depth 20, micro-batch 32, 32K vocab, an OOM on an 80 GB GPU. Inside a whole-model
        torch.compile the plain path is what Inductor fuses best (its logits never materialise in fp32)."""
        if self.fused_loss is not None:
            return self.fused_loss
        return x.device.type == "cpu" or not torch.compiler.is_compiling()

    def get_device(self) -> torch.device:
        return self.wte.weight.device

    def set_attention(self, requested: str | None = None) -> Attention:
        """Resolve the attention backend for the device the weights are on (call after moving the
        model, before torch.compile: flex block masks for the training shape are built here)."""
        if requested is not None:
            self.attention = requested
        device = self.get_device()
        windowed = any(w < self.config.sequence_len for w in self.windows)
        self._attn = resolve_attention(self.attention, device.type, self.compute_dtype, windowed=windowed)
        if device.type != "meta":
            self._attn.prepare(self.config.sequence_len, self.windows, device)
        return self._attn

    def before_compile(self) -> None:
        """Call once before torch.compile(model): resolves the attention backend (and builds its block
        masks) and prepares the eager fused loss, so that neither happens inside the trace."""
        self.set_attention()
        _fused_loss_outside_graph()

    def compile_blocks(self, **compile_kwargs) -> "GPT":
        """Regional compilation: torch.compile each transformer block in place (the embeddings, the residual
        scalars and the head stay eager) and return the model itself. Same-shaped blocks share their graphs
        (one per window size and value-embedding variant), so compiling takes a fraction of the whole
        model's time; and each block's backward is its own autograd node, so the gradients of the last
        blocks are final while backward still runs through the first: the optimizer's reductions can
        overlap it (nanochat.optim.MuonAdamW.overlap_backward). A whole-model compile finishes every
        gradient at once, at the end of backward, but fuses across block boundaries. Only training
        forwards (gradients on, no KV cache) take the compiled blocks: evaluation and decoding shapes
        would each compile again."""
        self.before_compile()
        self._compiled_blocks = [torch.compile(block, **compile_kwargs) for block in self.blocks]
        return self

    @property
    def attention_backend(self) -> str:
        """The resolved attention backend, e.g. "flex (KV-cache decode: sdpa)" (resolved on first use)."""
        attn = self._attn if self._attn is not None else self.set_attention()
        return attn.describe()

    def _attention_impl(self, device_type: str) -> Attention:
        if self._attn is None or self._attn.device_type != device_type:
            return self.set_attention()
        return self._attn

    # --- forward ------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean",
                kv_cache=None, positions: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`positions=(rows, cols)` returns logits (N, vocab) at those (b, t) only: scoring a few
        continuation tokens of a long prompt (CORE) then skips the LM head everywhere else."""
        B, T = idx.shape
        if positions is not None and targets is not None:
            raise ValueError("positions= selects logits for scoring; it cannot be combined with targets")
        t0 = kv_cache.pos if kv_cache is not None else 0
        if isinstance(t0, torch.Tensor):  # a SlotKVCache: every row at its own position
            end = kv_cache.end(T)
            t = t0[:, None] + torch.arange(T, device=idx.device)[None, :]  # (B, T)
        else:
            end = t0 + T
        if end > self.cos.size(1):
            raise ValueError(f"sequence position {end} exceeds the rotary table ({self.cos.size(1)}): "
                             f"generate fewer tokens or raise sequence_len")
        if isinstance(t0, torch.Tensor):
            cos, sin = self.cos[0, t].to(self.compute_dtype), self.sin[0, t].to(self.compute_dtype)  # (B, T, 1, D/2)
        else:
            cos, sin = self.cos[:, t0:t0 + T].to(self.compute_dtype), self.sin[:, t0:t0 + T].to(self.compute_dtype)
        x = rms_norm(self.wte(idx).to(self.compute_dtype))  # (B, T, C)
        x0 = x
        attn = self._attention_impl(idx.device.type)
        blocks = self.blocks
        if self._compiled_blocks is not None and kv_cache is None and torch.is_grad_enabled():
            blocks = self._compiled_blocks
        for i, block in enumerate(blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], kv_cache, attn)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = rms_norm(x)
        if positions is not None:
            x = x[positions[0], positions[1]]  # (N, C)
        if targets is not None and loss_reduction in ("mean", "sum") and torch.is_grad_enabled() \
                and self._use_fused_loss(x):
            # under torch.compile the chunk loop would be unrolled (compile time linear in the chunks):
            # it runs eagerly instead, a graph break at the head (torch.compiler.disable)
            fused = (_FUSED_LOSS_EAGER or _fused_loss_outside_graph()) if torch.compiler.is_compiling() \
                else linear_softcap_cross_entropy
            return fused(x, self.lm_head.weight, targets, vocab_size=self.config.vocab_size,
                         softcap=self.config.logit_softcap, reduction=loss_reduction,
                         chunk_rows=self.fused_loss_chunk_rows)
        if targets is not None and loss_reduction == "none":
            return self._per_token_loss(x, targets)
        logits = self.lm_head(x)[..., :self.config.vocab_size].float()  # (B, T, vocab) or (N, vocab), fp32
        cap = self.config.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        if loss_reduction not in ("mean", "sum"):  # ("none" was handled above, in chunks)
            raise ValueError(f"loss_reduction must be mean, sum or none, not {loss_reduction!r}")
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def _per_token_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) cross-entropy per target (0 where ignored), the fp32 logits made a chunk of rows at a time."""
        B, T, C = x.shape
        V = self.config.vocab_size
        x2, t2 = x.reshape(B * T, C), targets.reshape(B * T)
        rows = max(1, self.eval_logits_chunk_elems // V)
        cap = self.config.logit_softcap
        losses = []
        for lo in range(0, B * T, rows):
            logits = self.lm_head(x2[lo:lo + rows])[..., :V].float()  # (rows, V) fp32
            if cap:
                logits = cap * torch.tanh(logits / cap)
            losses.append(F.cross_entropy(logits, t2[lo:lo + rows], ignore_index=-1, reduction="none"))
        return (losses[0] if len(losses) == 1 else torch.cat(losses)).view(B, T)


_FUSED_LOSS_EAGER = None


def _fused_loss_outside_graph():
    """linear_softcap_cross_entropy behind torch.compiler.disable. Made by GPT.before_compile() (or, one
    extra graph break later, on first use inside a trace): never at import, because making it imports
    dynamo, which costs seconds in every process that does not compile."""
    global _FUSED_LOSS_EAGER
    if _FUSED_LOSS_EAGER is None:
        _FUSED_LOSS_EAGER = torch.compiler.disable(linear_softcap_cross_entropy)
    return _FUSED_LOSS_EAGER

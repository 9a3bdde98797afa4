"""fp8 training of the transformer block Linears: tensorwise dynamic scaling through torch._scaled_mm.

Each converted Linear computes `y = x @ W.T` as

    forward   x -> e4m3, W -> e4m3 (each with one scale: fp8_max / amax), y = scaled_mm(x8, W8.T)
              with fast accumulation (as torchao's tensorwise recipe; the gradient GEMMs keep fp32 promotion)
    backward  dy -> e5m2 (wider range, 2 mantissa bits: gradients), dx = scaled_mm(dy8, W8),
              dW = scaled_mm(dy8.T, x8) in fp32 for the fp32 master weight

where scaled_mm multiplies the fp8 operands on the tensor cores and rescales the fp32 accumulator by
the two inverse scales. Scales are recomputed from the current amax at every call ("dynamic"), so
nothing is carried between steps and checkpoints are unchanged (the weights stay fp32 parameters of
the same modules). Only the block matrices are converted (q, k, v, attention and MLP projections):
the LM head, embeddings and value-embedding gates keep the compute dtype (REFERENCE.md section 13:
+17% tok/s at d26 for the reference, ~5% at matched capability).

FLOPs per token and MFU are unchanged by the conversion: they come from the config's shapes
(nanochat/sizing.py), not from walking module classes, and MFU stays against the dense bf16 peak.

`torch._scaled_mm` needs fp8 tensor cores (sm89+: Ada, Hopper, Blackwell); elsewhere `enable_fp8`
refuses, except with `emulate=True`, which does the same quantisation and an fp32 matmul of the
dequantised operands (what the CPU tests check the scaling and casting logic with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.gpt import Linear

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344
AMAX_EPS = 1e-12  # an all-zero tensor gets a finite scale (and quantises to zeros)


def fp8_scale(x: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Tensorwise scale (0-d fp32) mapping x's largest magnitude to the largest fp8 value."""
    amax = x.detach().abs().amax().float()
    return FP8_MAX[fp8_dtype] / amax.clamp(min=AMAX_EPS)


def to_fp8(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * scale saturated and rounded to fp8, 1 / scale): x ~= x8.float() * inv_scale."""
    scale = fp8_scale(x, fp8_dtype)
    fmax = FP8_MAX[fp8_dtype]
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(fp8_dtype)
    return x8, scale.reciprocal()


def scaled_mm(a8: torch.Tensor, b8: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
              out_dtype: torch.dtype, emulate: bool = False, fast_accum: bool = False) -> torch.Tensor:
    """(a8 * inv_a) @ (b8 * inv_b) in out_dtype. a8 (M, K) row-major, b8 (K, N) column-major (the
    layout torch._scaled_mm requires); emulate: dequantise and multiply in fp32 instead.

    fast_accum: Hopper's fp8 tensor cores accumulate in a reduced-precision register unless the kernel
    promotes partial sums to fp32 every few K-blocks; fast accumulation skips that promotion (faster, a
    little less exact). torchao's tensorwise recipe uses it for the forward GEMM only and keeps the
    gradient GEMMs exact: so does `_Fp8Matmul`."""
    if emulate:
        return ((a8.float() * inv_a) @ (b8.float() * inv_b)).to(out_dtype)
    return torch._scaled_mm(a8, b8, scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, emulate):
        # x2 (N, in) in the compute dtype, weight (out, in) fp32 master
        x8, inv_x = to_fp8(x2, E4M3)
        w8, inv_w = to_fp8(weight, E4M3)
        ctx.save_for_backward(x8, inv_x, w8, inv_w)
        ctx.emulate, ctx.x_dtype, ctx.w_dtype = emulate, x2.dtype, weight.dtype
        # (N, out); w8.t() is column-major; fast accumulation in the forward only (see scaled_mm)
        return scaled_mm(x8, w8.t(), inv_x, inv_w, x2.dtype, emulate, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x8, inv_x, w8, inv_w = ctx.saved_tensors
        g8, inv_g = to_fp8(grad_out, E5M2)  # (N, out)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_mm(g8, _col_major(w8), inv_g, inv_w, ctx.x_dtype, ctx.emulate)  # (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = scaled_mm(g8.t().contiguous(), _col_major(x8), inv_g, inv_x, torch.float32,
                               ctx.emulate).to(ctx.w_dtype)  # (out, in)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, emulate: bool = False) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with fp8 operands; x (..., in), weight (out, in)."""
    y = _Fp8Matmul.apply(x.reshape(-1, x.size(-1)), weight, emulate)
    return y.view(*x.shape[:-1], weight.size(0))


def fp8_supported(device: torch.device | str) -> str | None:
    """None when `device` has fp8 tensor cores torch._scaled_mm can use, else the reason it has not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"this run is on {device.type}"
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"{torch.cuda.get_device_name(device)} is sm{cap[0]}{cap[1]}"
    return None


# the block Linears that carry nearly all the matmul FLOPs; ve_gate (32 -> kv heads) stays as it is
FP8_MODULES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def enable_fp8(model, emulate: bool = False) -> list[str]:
    """Convert the block Linears of a GPT to fp8 in place; returns the converted module names.

    Refuses (ValueError, one line) on devices without fp8 tensor cores unless `emulate`. Parameters,
    state_dict keys and param groups are untouched: only the modules' forward changes."""
    if not emulate:
        reason = fp8_supported(model.get_device())
        if reason:
            raise ValueError(f"--fp8 needs a GPU with fp8 tensor cores (sm89+: Ada, Hopper, Blackwell) and "
                             f"torch._scaled_mm; {reason}: drop --fp8")
        if model.compute_dtype != torch.bfloat16:
            raise ValueError(f"--fp8 runs with bf16 compute (outputs and gradients); this run uses "
                             f"{str(model.compute_dtype).replace('torch.', '')}: drop --dtype or --fp8")
    converted = []
    for i, block in enumerate(model.blocks):
        for name in FP8_MODULES:
            module = block.get_submodule(name)
            if type(module) is not Linear:
                continue
            out_f, in_f = module.weight.shape
            if out_f % 16 or in_f % 16:  # _scaled_mm needs multiples of 16
                continue
            module.__class__ = Fp8Linear
            module.fp8_emulate = emulate
            converted.append(f"blocks.{i}.{name}")
    return converted


class Fp8Linear(Linear):
    """A gpt.Linear whose matmul runs in fp8 (see the module docstring); made by `enable_fp8`."""

    fp8_emulate = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.size(-1) % 16:  # _scaled_mm needs rows in multiples of 16 (e.g. decoding)
            return F.linear(x, self.weight.to(x.dtype))
        return fp8_linear(x, self.weight, self.fp8_emulate)

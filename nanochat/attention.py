"""Attention kernels, chosen once per model: FA3, FA4, FlexAttention or PyTorch SDPA.

Every backend computes the same causal, optionally sliding-window attention:

    q (B, T, H, D) at absolute positions q_offset .. q_offset+T-1; k, v (B, S, K, D) at 0 .. S-1.
    Query i sees key j when j <= i and i - j < window.  Returns (B, T, H, D).  K divides H (GQA).
    `q_offset` may also be a (B,) tensor, one position per row (rows of a SlotKVCache): SDPA only.

Backends, in the order `auto` prefers them on CUDA (REFERENCE.md section 13):

- `fa3`: Flash Attention 3 (`flash_attn_interface`), Hopper, bf16/fp16. Only from a source build or
  a hub download (none here), so it is used when it happens to be importable.
- `fa4`: Flash Attention 4, the CuTe-DSL kernels of the `flash-attn-4` PyPI wheel
  (`flash_attn.cute`), Hopper and Blackwell, bf16/fp16.
- `flex-fa4`: FlexAttention's FlashAttention-4 backend (`kernel_options={"BACKEND": "FLASH"}`, added
  to torch's Inductor in 2.11 for Hopper and Blackwell, reported 1.2-3.2x over its Triton kernels): the
  same block masks, run by FA4's CuTe-DSL kernels inside the compiled graph. Detected by capability --
  the installed torch has the backend (`torch._inductor.kernel.flex.flex_flash_attention`), the GPU is
  sm90/sm100, and `flash_attn.cute` is importable (torch's backend calls into the flash-attn-4 wheel) --
  never by version string.
- `flex`: FlexAttention (`torch.nn.attention.flex_attention`), inside torch: causal + sliding-window
  block masks, so windowed layers skip the blocks outside the window; compiled to Triton on CUDA.
  On CPU it runs eagerly, forward only (torch has no CPU backward for it): tests use that.
- `sdpa`: `F.scaled_dot_product_attention`: the flash kernel for full causal layers; a window needs
  an explicit (T, S) mask, which falls back to a slow kernel with no block skipping.

`auto` on CUDA takes FA3 > FA4 > flex-fa4 > flex when the model has windowed layers, and FA3 > FA4 >
SDPA when it has none (SDPA's flash kernel is the fastest plain-causal kernel that ships with torch); on
CPU and MPS it is always SDPA (the numerics tests/test_golden.py pins). flex-fa4 needs the same
`flash_attn.cute` as fa4, so where it can run `auto` already runs FA4's kernels, called directly (no
block-mask indirection); benchmarks/gpu_bench.py measures fa4, flex-fa4 and flex side by side (its
`backends` section) so that this order can follow measurements once a GPU has run them.

KV-cache decoding (q_offset > 0): FA3/FA4 take it directly (their causal mask is aligned to the
bottom-right, i.e. q_offset = S - T); flex falls back to SDPA with an explicit mask for those calls
(a block mask per decode step would cost more than it saves), stated in `Attention.decode_name`, and
for sequence lengths other than the one `prepare` built masks for (the model's sequence_len).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

ATTENTION_CHOICES = ("auto", "fa3", "fa4", "flex-fa4", "flex", "sdpa")
FLASH_DTYPES = (torch.bfloat16, torch.float16)
INSTALL_HINT = ("pip install flash-attn-4 (Hopper/Blackwell), or use --attention flex (FlexAttention, "
                "inside torch)")


# ---------------------------------------------------------------------------------------------
# the reference path: SDPA (flash kernel for full causal, explicit mask otherwise)


def sdpa_attend(q, k, v, window: int, q_offset: int = 0) -> torch.Tensor:
    """Causal (optionally sliding-window) attention through SDPA; shapes as in the module docstring."""
    T, S = q.size(1), k.size(1)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T|S, D)
    gqa = qh.size(1) != kh.size(1)
    if isinstance(q_offset, torch.Tensor):  # (B,) per-row positions: rows of different lengths decoded together
        qpos = q_offset[:, None, None] + torch.arange(T, device=q.device)[None, :, None]  # (B, T, 1)
        kpos = torch.arange(S, device=q.device)[None, None, :]
        mask = ((kpos <= qpos) & (qpos - kpos < window)).unsqueeze(1)  # (B, 1, T, S)
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)
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


class Attention:
    """A resolved backend: call it like `sdpa_attend`. `name` is what runs the training-shaped calls
    (q_offset 0, T == S), `decode_name` what runs KV-cache calls."""

    name = "sdpa"
    decode_name = "sdpa"

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __call__(self, q, k, v, window: int, q_offset: int = 0) -> torch.Tensor:
        return sdpa_attend(q, k, v, window, q_offset)

    def prepare(self, seq_len: int, windows, device) -> None:
        """Build whatever the training shape needs (block masks) before torch.compile traces a call."""

    def describe(self) -> str:
        return self.name if self.decode_name == self.name else f"{self.name} (KV-cache decode: {self.decode_name})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class SDPAAttention(Attention):
    pass


class _FlashAttention(Attention):
    """FA3 / FA4: (B, T, H, D) layout, native GQA, causal mask aligned bottom-right (q_offset = S - T)."""

    def __init__(self, device_type: str, func):
        super().__init__(device_type)
        self.func = func
        self.decode_name = self.name

    def _window(self, window: int, S: int):
        raise NotImplementedError

    def __call__(self, q, k, v, window: int, q_offset: int = 0) -> torch.Tensor:
        T, S = q.size(1), k.size(1)
        if q_offset != S - T or q.dtype not in FLASH_DTYPES:
            return sdpa_attend(q, k, v, window, q_offset)
        out = self.func(q, k, v, causal=True, window_size=self._window(window, S))
        return out[0] if isinstance(out, tuple) else out


class FA3Attention(_FlashAttention):
    name = "fa3"

    def _window(self, window: int, S: int):
        return (window - 1 if window < S else -1, 0)  # -1: unlimited


class FA4Attention(_FlashAttention):
    name = "fa4"

    def _window(self, window: int, S: int):
        return (window - 1 if window < S else None, 0)  # None: unlimited


class FlexAttention(Attention):
    name = "flex"
    decode_name = "sdpa"
    MAX_CACHED_MASKS = 32

    def __init__(self, device_type: str, compile: bool | None = None, kernel_options: dict | None = None):
        super().__init__(device_type)
        self.kernel_options = kernel_options  # {"BACKEND": "FLASH"}: FlexFA4Attention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._create_block_mask = create_block_mask
        compile = device_type == "cuda" if compile is None else compile
        # eager flex materialises the full score matrix; compiled it is a fused Triton kernel that
        # skips the masked-out blocks (nested inside a compiled model it is inlined)
        self._flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
        self._masks: dict = {}
        self.lengths: set[int] = set()  # sequence lengths prepared (the training shape); others go to SDPA
        if not compile:
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    def block_mask(self, T: int, window: int, device):
        device = torch.device(device)
        key = (T, min(window, T), device.type, device.index)  # plain values: cheap for dynamo to guard
        mask = self._masks.get(key)
        if mask is None:
            w = key[1]

            def causal_window(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (q_idx - kv_idx < w)

            mask = self._create_block_mask(causal_window, None, None, T, T, device=device)
            if not torch.compiler.is_compiling():  # built inside a trace it belongs to that graph
                if len(self._masks) >= self.MAX_CACHED_MASKS:
                    self._masks.pop(next(iter(self._masks)))
                self._masks[key] = mask
        return mask

    def prepare(self, seq_len: int, windows, device) -> None:
        self.lengths.add(seq_len)
        for w in sorted(set(windows)):
            self.block_mask(seq_len, w, device)

    def __call__(self, q, k, v, window: int, q_offset: int = 0) -> torch.Tensor:
        T, S = q.size(1), k.size(1)
        if q_offset != 0 or T != S or (self.lengths and T not in self.lengths) or (
                self.device_type == "cpu" and torch.is_grad_enabled()
                and (q.requires_grad or k.requires_grad or v.requires_grad)):
            # KV-cache calls; lengths other than the prepared training shape (CORE's varying prompts would
            # otherwise recompile the kernel per length); CPU training (torch has no CPU backward for
            # flex): SDPA, same math
            return sdpa_attend(q, k, v, window, q_offset)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        extra = {"kernel_options": self.kernel_options} if self.kernel_options else {}
        y = self._flex(qh, kh, vh, block_mask=self.block_mask(T, window, q.device),
                       enable_gqa=qh.size(1) != kh.size(1), **extra)
        return y.transpose(1, 2)


class FlexFA4Attention(FlexAttention):
    """FlexAttention with torch's FlashAttention-4 backend (see the module docstring): block masks as `flex`,
    FA4's kernels instead of the Triton ones."""

    name = "flex-fa4"

    def __init__(self, device_type: str, compile: bool | None = None):
        super().__init__(device_type, compile, kernel_options={"BACKEND": "FLASH"})


# ---------------------------------------------------------------------------------------------
# availability and resolution


def load_fa3():
    """`flash_attn_interface.flash_attn_func`, or None when FA3 is not importable."""
    try:
        import flash_attn_interface  # FA3 (Hopper build)

        return flash_attn_interface.flash_attn_func
    except Exception:  # not installed, or built for another GPU / torch
        return None


def load_fa4():
    """`flash_attn.cute.flash_attn_func` of the flash-attn-4 wheel, or None."""
    try:
        from flash_attn.cute import flash_attn_func

        return flash_attn_func
    except Exception:
        return None


def _capability(device_type: str) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if device_type == "cuda" else None


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


def torch_has_flex_flash() -> bool:
    """Whether the installed torch's Inductor has FlexAttention's FLASH (FA4) backend: the capability itself,
    not a version comparison (backports and nightlies differ from the release numbering)."""
    return _module_exists("torch._inductor.kernel.flex.flex_flash_attention")


def unavailable_reason(name: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot run here (None when it can)."""
    if name == "sdpa":
        return None
    if name == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return f"this torch ({torch.__version__}) has no torch.nn.attention.flex_attention (needs >= 2.5)"
        return None
    if device_type != "cuda":
        return f"{name} needs a CUDA GPU (this run is on {device_type})"
    if dtype not in FLASH_DTYPES:
        return f"{name} needs bf16 or fp16 compute (this run uses {str(dtype).replace('torch.', '')})"
    cap = _capability(device_type)
    if name == "fa3":
        if cap[0] != 9:
            return f"FA3 is built for Hopper (sm90); this GPU is sm{cap[0]}{cap[1]}"
        if load_fa3() is None:
            return "flash_attn_interface (FA3) is not importable: it ships only as a source build"
        return None
    if name == "fa4":
        if cap[0] < 9:
            return f"FA4 needs Hopper or Blackwell (sm90+); this GPU is sm{cap[0]}{cap[1]}"
        if load_fa4() is None:
            return "flash_attn.cute (FA4) is not importable: pip install flash-attn-4"
        return None
    if name == "flex-fa4":
        if not torch_has_flex_flash():
            return f"this torch ({torch.__version__}) has no FlashAttention backend for FlexAttention"
        if cap[0] not in (9, 10):
            return f"FlexAttention's FA4 backend runs on Hopper or Blackwell (sm90/sm100); this GPU is sm{cap[0]}{cap[1]}"
        if not _module_exists("flash_attn.cute"):
            return "FlexAttention's FA4 backend calls flash_attn.cute, which is not importable: pip install flash-attn-4"
        return None
    raise ValueError(f"unknown attention backend {name!r}: use one of {', '.join(ATTENTION_CHOICES)}")


def auto_backend(device_type: str, dtype: torch.dtype, windowed: bool) -> str:
    """The backend `auto` picks (see the module docstring)."""
    if device_type != "cuda":
        return "sdpa"
    order = ("fa3", "fa4", "flex-fa4", "flex", "sdpa") if windowed else ("fa3", "fa4", "sdpa")
    return next(n for n in order if unavailable_reason(n, device_type, dtype) is None)


def windowed_kernel_available(device_type: str, dtype: torch.dtype, requested: str = "auto") -> bool:
    """True when sliding-window layers would run on a block-skipping kernel (FA3, FA4 or compiled flex):
    the condition for the record architecture (SSSL windows) to be the CUDA default."""
    if device_type != "cuda":
        return False
    name = auto_backend(device_type, dtype, windowed=True) if requested == "auto" else requested
    return name in ("fa3", "fa4", "flex-fa4", "flex") and unavailable_reason(name, device_type, dtype) is None


_warned_sdpa_window = False


def resolve_attention(requested: str, device_type: str, dtype: torch.dtype, windowed: bool = True) -> Attention:
    """The backend for a model on `device_type` computing in `dtype`. `requested` is one of
    ATTENTION_CHOICES; an explicit choice that cannot run here is a ValueError saying why."""
    global _warned_sdpa_window
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"--attention {requested!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    name = auto_backend(device_type, dtype, windowed) if requested == "auto" else requested
    reason = unavailable_reason(name, device_type, dtype)
    if reason:
        raise ValueError(f"--attention {name} cannot run here: {reason}. Use --attention auto")
    if name == "fa3":
        return FA3Attention(device_type, load_fa3())
    if name == "fa4":
        return FA4Attention(device_type, load_fa4())
    if name == "flex":
        return FlexAttention(device_type)
    if name == "flex-fa4":
        return FlexFA4Attention(device_type)
    if windowed and device_type == "cuda" and not _warned_sdpa_window:
        _warned_sdpa_window = True
        warnings.warn("sliding-window layers run through SDPA with a dense mask (no flash kernel, no block "
                      f"skipping, ~3x slower for those layers): {INSTALL_HINT}", stacklevel=2)
    return SDPAAttention(device_type)

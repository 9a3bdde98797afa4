"""Configuration of a nanochat GPT exported with remote code (`trust_remote_code=True`).

Written by nanochat's `scripts/export_hf.py`; this folder needs only torch and transformers. The
fields are explicit per layer (window sizes, which layers have value embeddings), so the modeling
file does not need nanochat's own config rules.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class NanoChatGPTConfig(PreTrainedConfig):
    model_type = "nanochat_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=32768, padded_vocab_size=None, hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=None, max_position_embeddings=2048,
                 window_sizes=None, value_embed_layers=None, ve_gate_channels=32, resid_scalars=False,
                 rope_theta=100000.0, qk_gain=1.2, final_logit_softcapping=15.0, intermediate_size=None,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, **kwargs):
        kwargs.pop("tie_word_embeddings", None)
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or vocab_size  # embedding / head rows (>= vocab_size)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        # keys a query may see (itself included), per layer; full-context layers have the training context
        self.window_sizes = list(window_sizes or [max_position_embeddings] * num_hidden_layers)
        self.value_embed_layers = list(value_embed_layers or [])
        self.ve_gate_channels = ve_gate_channels
        self.resid_scalars = resid_scalars
        self.rope_theta = rope_theta
        self.qk_gain = qk_gain
        self.final_logit_softcapping = final_logit_softcapping
        # what transformers' DynamicCache reads: short-window layers keep only their last window-1 keys
        short = [w for w in self.window_sizes if w < max_position_embeddings]
        self.sliding_window = max(short) if short else None  # a superset for any smaller window
        self.layer_types = ["sliding_attention" if w < max_position_embeddings else "full_attention"
                            for w in self.window_sizes]
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, **kwargs)

"""One tiny config per registry family, with non-default values of every family-specific field.

Each config is small (hidden 64, 4 layers) but sets what makes its family differ from Llama to a
value other than its default, so a split that misses a family's behaviour fails the family test:
soft-caps, multipliers, sliding windows shorter than the test sequences, partial rotary, rope
scaling, MoE routing and latent attention widths. A family may have several variants (Llama: llama3
and yarn rope scaling). Adding a registry entry without a variant here fails the family test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import (
    CohereConfig,
    DeepseekV3Config,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

WINDOW = 6
"""Sliding window of the sliding families: shorter than prefix + prompt + generated tokens."""

_SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _sized(**overrides: Any) -> dict[str, Any]:
    return {**_SIZES, **overrides}


def _llama3(num_layers: int, vocab: int) -> PretrainedConfig:
    rope = dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=4.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    return LlamaConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, head_dim=24),
        rope_parameters=rope,
        attention_bias=True,
        mlp_bias=True,
    )


def _llama_yarn(num_layers: int, vocab: int) -> PretrainedConfig:
    rope = dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=4.0,
        original_max_position_embeddings=32,  # max_position_embeddings / factor
        beta_fast=16.0,
        beta_slow=2.0,
    )
    return LlamaConfig(**_sized(vocab_size=vocab, num_hidden_layers=num_layers), rope_parameters=rope)


def _qwen2(num_layers: int, vocab: int) -> PretrainedConfig:
    # layers >= max_window_layers slide: a mix of full and sliding layers on both sides of K = 2
    return Qwen2Config(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers),
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    )


def _qwen3(num_layers: int, vocab: int) -> PretrainedConfig:
    return Qwen3Config(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, head_dim=24),
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=3,
        attention_bias=True,
    )


def _qwen3_moe(num_layers: int, vocab: int) -> PretrainedConfig:
    return Qwen3MoeConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, head_dim=24),
        use_sliding_window=True,
        sliding_window=WINDOW,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=2,  # layers 1 and 3 on the sparse grid, then layer 1 made dense:
        mlp_only_layers=[1],  # the emulator (layers 0, 1, 3) must renumber the pattern
    )


def _mistral(num_layers: int, vocab: int) -> PretrainedConfig:
    return MistralConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, head_dim=24), sliding_window=WINDOW
    )


def _mixtral(num_layers: int, vocab: int) -> PretrainedConfig:
    return MixtralConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers),
        sliding_window=WINDOW,
        num_local_experts=4,
        num_experts_per_tok=1,
    )


def _phi3(num_layers: int, vocab: int) -> PretrainedConfig:
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    return Phi3Config(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers), sliding_window=WINDOW, rope_parameters=rope
    )


def _phi3_longrope(num_layers: int, vocab: int) -> PretrainedConfig:
    # Phi-3 128k style: long factors once positions pass original_max_position_embeddings, which the
    # family test's generation does (prefix 3 + prompt 12 + 8 new > 16)
    rope = dict(
        rope_type="longrope",
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        short_factor=[1.0, 1.1, 1.2, 1.3],
        long_factor=[2.0, 3.0, 4.0, 5.0],
        original_max_position_embeddings=16,
    )
    return Phi3Config(**_sized(vocab_size=vocab, num_hidden_layers=num_layers), rope_parameters=rope)


def _olmo2(num_layers: int, vocab: int) -> PretrainedConfig:
    return Olmo2Config(**_sized(vocab_size=vocab, num_hidden_layers=num_layers), attention_bias=True)


def _gemma2(num_layers: int, vocab: int) -> PretrainedConfig:
    return Gemma2Config(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, head_dim=24),
        sliding_window=WINDOW,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=3.0,
        query_pre_attn_scalar=20,
    )


def _gemma3(num_layers: int, vocab: int) -> PretrainedConfig:
    rope = {
        "sliding_attention": dict(rope_type="default", rope_theta=500.0),
        "full_attention": dict(rope_type="linear", rope_theta=20000.0, factor=2.0),
    }
    return Gemma3TextConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, head_dim=24),
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
        + ["sliding_attention"] * (num_layers % 2),
        rope_parameters=rope,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=3.0,
        query_pre_attn_scalar=20,
    )


def _granite(num_layers: int, vocab: int) -> PretrainedConfig:
    return GraniteConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers),
        embedding_multiplier=3.0,
        logits_scaling=2.5,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
    )


def _cohere(num_layers: int, vocab: int) -> PretrainedConfig:
    return CohereConfig(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers), logit_scale=0.4, use_qk_norm=True
    )


def _gpt2(num_layers: int, vocab: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_layer=num_layers,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
    )


def _gpt_neox(num_layers: int, vocab: int) -> PretrainedConfig:
    rope = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)
    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters=rope,
        use_parallel_residual=False,
    )


def _deepseek_v3(num_layers: int, vocab: int) -> PretrainedConfig:
    return DeepseekV3Config(
        **_sized(vocab_size=vocab, num_hidden_layers=num_layers, num_key_value_heads=4),
        kv_lora_rank=20,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=12,
        v_head_dim=10,
        moe_intermediate_size=32,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=False,
        rope_interleave=False,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=32,
            mscale=1.0,
            mscale_all_dim=0.8,  # scales the attention, not only the rotary embedding
        ),
    )


_FALCON_SIZES = dict(
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _falcon_rotary(num_layers: int, vocab: int) -> PretrainedConfig:
    return FalconConfig(
        **_FALCON_SIZES,
        vocab_size=vocab,
        num_hidden_layers=num_layers,
        num_kv_heads=2,
        new_decoder_architecture=True,
        num_ln_in_parallel_attn=2,
        bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=5000.0),
    )


def _falcon_alibi(num_layers: int, vocab: int) -> PretrainedConfig:
    return FalconConfig(
        **_FALCON_SIZES,
        vocab_size=vocab,
        num_hidden_layers=num_layers,
        alibi=True,
        multi_query=False,
        parallel_attn=False,
    )


FAMILY_VARIANTS: dict[str, tuple[str, Callable[[int, int], PretrainedConfig]]] = {
    "llama-llama3": ("llama", _llama3),
    "llama-yarn": ("llama", _llama_yarn),
    "qwen2-sliding": ("qwen2", _qwen2),
    "qwen3": ("qwen3", _qwen3),
    "qwen3_moe": ("qwen3_moe", _qwen3_moe),
    "mistral-sliding": ("mistral", _mistral),
    "mixtral": ("mixtral", _mixtral),
    "phi3": ("phi3", _phi3),
    "phi3-longrope": ("phi3", _phi3_longrope),
    "olmo2": ("olmo2", _olmo2),
    "gemma2": ("gemma2", _gemma2),
    "gemma3_text": ("gemma3_text", _gemma3),
    "granite": ("granite", _granite),
    "cohere": ("cohere", _cohere),
    "gpt2-scaled": ("gpt2", _gpt2),
    "gpt_neox": ("gpt_neox", _gpt_neox),
    "deepseek_v3": ("deepseek_v3", _deepseek_v3),
    "falcon-rotary": ("falcon", _falcon_rotary),
    "falcon-alibi": ("falcon", _falcon_alibi),
}
"""Variant id -> (registry family, builder(num_layers, vocab_size)). Ids differ from the plain
configs of conftest.ARCHS, which the older per-architecture tests use."""

EAGER_ONLY = {"gemma2"}
"""Variants whose HF class refuses sdpa (Gemma 2's attention soft-cap)."""


def family_config(variant: str, num_layers: int = 4, vocab_size: int = 96) -> PretrainedConfig:
    """The tiny config of one variant of `FAMILY_VARIANTS`."""
    return FAMILY_VARIANTS[variant][1](num_layers, vocab_size)

"""Tiny random models of every supported architecture, built inside the tests (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from families import EAGER_ONLY, FAMILY_VARIANTS, family_config

pytest_plugins = ["app_fixtures", "split_fixtures"]  # fixtures shared by several test modules

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 96


def tiny_config(arch: str, num_layers: int = 4, vocab_size: int = VOCAB) -> PretrainedConfig:
    """A 4-layer, 64-wide config; rotary families use grouped-query attention (4 heads, 2 kv heads).

    `arch` is one of ARCHS (plain configs) or a variant id of families.FAMILY_VARIANTS.
    """
    if arch in FAMILY_VARIANTS:
        return family_config(arch, num_layers, vocab_size)
    rotary = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**rotary)
    if arch == "qwen2":
        return Qwen2Config(**rotary)
    if arch == "mistral":
        return MistralConfig(**rotary, sliding_window=64)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=num_layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    raise ValueError(arch)


def build_tiny_model(
    arch: str, attn: str | None = None, seed: int = 0, num_layers: int = 4, vocab_size: int = VOCAB
) -> PreTrainedModel:
    """A seeded tiny random model in eval mode, fp32; `attn` defaults to sdpa where the family has it."""
    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers, vocab_size)
    attn = attn or ("eager" if arch in EAGER_ONLY else "sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def random_batch(
    batch: int = 3, length: int = 7, padding: str | None = None, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and a token mask; padding 'left' or 'right' shortens rows 1.. by 1, 2, ..."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padding is not None:
        for row in range(1, batch):
            pad = min(row * 2, length - 1)
            if padding == "right":
                mask[row, length - pad :] = 0
            else:
                mask[row, :pad] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


TOKENIZER_VOCAB = 320
_TEXT = [
    "Customer: I want a refund for my order.",
    "Customer: please cancel my subscription today",
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into ids and back again.",
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (pad=0, bos=1, eos=2) trained in memory; pairs with vocab_size=TOKENIZER_VOCAB."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param

"""Shared by the split-training tests: a saved tiny model, its emulator, a server for it, training data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from conftest import TOKENIZER_VOCAB, build_tiny_model, build_tiny_tokenizer
from splitprefix.data.batching import EncodedExample, encode_examples
from splitprefix.data.formats import Example
from splitprefix.data_party.train import TrainConfig
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model_party.compress import emulate
from splitprefix.model_party.settings import ServerSettings

SPLIT_AT = 2
PREFIX_LEN = 3
# Split and whole run the same ops; only the summation order of the loss and the gradients differs.
TIGHT = dict(atol=1e-5, rtol=1e-5)
# Fast retries, so that fault tests spend their time on the fault, not on waiting.
FAST_RETRIES = dict(max_retries=40, backoff_s=0.02, backoff_max_s=0.2)


@dataclass
class SplitDirs:
    full: Path
    """The model party's full model."""
    emulator: Path
    """The emulator the data party received, cut at SPLIT_AT."""


def make_dirs(root: Path, arch: str = "llama", seed: int = 0, split_at: int = SPLIT_AT) -> SplitDirs:
    """A tiny 4-layer model saved with the tiny tokenizer, and its emulator (K = split_at, 1 upper layer)."""
    full = root / f"full-{arch}-{seed}"
    if not full.exists():
        build_tiny_model(arch, seed=seed, vocab_size=TOKENIZER_VOCAB).save_pretrained(full)
        build_tiny_tokenizer().save_pretrained(full)
    emulator = root / f"emu-{arch}-{seed}-k{split_at}"
    if not emulator.exists():
        emulate(str(full), split_at=split_at, keep=1, out=emulator)
    return SplitDirs(full, emulator)


def server_settings(dirs: SplitDirs, head: str = "both", **extra: object) -> ServerSettings:
    return ServerSettings(model_dir=str(dirs.full), split_at=SPLIT_AT, head=head, port=0, **extra)  # type: ignore[arg-type]


EXAMPLES = [
    Example(f"Customer: {text} {i}\nIntent:", completion)
    for i in range(6)
    for text, completion in (
        ("I want a refund for order", " refund"),
        ("please cancel it", " cancel subscription"),
    )
]


def encoded_examples(tokenizer) -> list[EncodedExample]:
    """Examples of different lengths, so that batches are right-padded."""
    return encode_examples(tokenizer, EXAMPLES, 64)


def write_jsonl(path: Path, examples: list[Example] = EXAMPLES) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n" for e in examples)
    )
    return path


def seeded_prefix(config, prefix_len: int = PREFIX_LEN, seed: int = 0) -> Prefix:
    torch.manual_seed(seed)
    return Prefix(PrefixConfig.for_model(config, prefix_len))


SHORT_RUN = TrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=5e-2, checkpoint_every=0)

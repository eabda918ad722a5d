"""The recipe that pretrains the built-in base model from scratch, offline, on two CPU cores.

`pretrain(config)` trains a byte-level BPE tokenizer and a small Llama (grouped-query attention, tied
embeddings) on the corpus of `splitprefix.pretraining.corpus`, and writes a standard Hugging Face
model directory with `recipe.json` and `eval.json` beside the weights. Every `checkpoint_every` steps
it stores a resumable checkpoint under `<out>/checkpoint/`; running the same config again resumes.
The batches are a pure function of (seed, step), so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import math
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from splitprefix.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from splitprefix.data.blocks import BlockSampler, pack_blocks
from splitprefix.errors import ConfigError
from splitprefix.files import write_json
from splitprefix.pretraining.corpus import DEFAULT_WORDNET_DIR, Corpus, build_corpus

# The trainer assigns ids in this order, so pad=0, bos=1, eos=2, unk=3.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHECKPOINT_DIR = "checkpoint"

_POSITIVE_FIELDS = (
    "steps", "batch_size", "block_size", "num_threads", "num_layers", "hidden_size", "num_heads",
    "num_kv_heads", "intermediate_size", "checkpoint_every", "log_every", "eval_max_blocks",
)  # fmt: skip
# Fields that may change between a run and its resumption without changing the trained weights.
_RUN_ONLY_FIELDS = (
    "out",
    "checkpoint_every",
    "keep_checkpoint",
    "log_every",
    "num_threads",
    "eval_max_blocks",
)


@dataclass
class PretrainConfig:
    """Every setting of one pretraining run; saved as `recipe.json` next to the weights."""

    out: Path = Path("runs/builtin")
    """Output model directory; its `checkpoint/` folder holds the resumable state while training."""
    steps: int = 1000
    """Optimizer steps in the whole run (sets the length of the cosine schedule)."""
    seed: int = 0
    """Seed of the held-out split, the initial weights and the batch order."""
    batch_size: int = 32
    """Blocks per optimizer step."""
    block_size: int = 128
    """Tokens per block; documents are packed back to back with an eos token between them."""
    lr: float = 1.5e-3
    """Peak AdamW learning rate, reached at the end of warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of `lr`."""
    warmup_steps: int = 100
    """Steps of linear warm-up from zero to `lr`."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Maximum global gradient norm."""
    bf16: bool = True
    """Run forward and backward under bfloat16 autocast (about 1.7x faster on CPU); weights stay fp32."""
    num_threads: int = 2
    """Threads torch may use."""
    vocab_size: int = 8192
    """Size of the byte-level BPE vocabulary, special tokens included."""
    num_layers: int = 8
    """Decoder layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    num_heads: int = 4
    """Query heads per attention layer."""
    num_kv_heads: int = 2
    """Key/value heads per attention layer (grouped-query attention when below `num_heads`)."""
    intermediate_size: int = 688
    """Width of the SwiGLU feed-forward layer."""
    max_position_embeddings: int = 512
    """Longest sequence the model is configured for."""
    wordnet_dir: Path = DEFAULT_WORDNET_DIR
    """Folder holding WordNet's data.{noun,verb,adj,adv} (Debian package `wordnet-base`)."""
    python_docs: bool = True
    """Add Python's help topics (`pydoc_data`) to the corpus."""
    stdlib_docstrings: bool = True
    """Add docstrings of a fixed set of standard-library modules to the corpus."""
    heldout_fraction: float = 0.02
    """Share of documents kept back for `eval.json`."""
    max_corpus_chars: int | None = None
    """Keep a seeded random subset of about this many characters (for quick runs and tests)."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints."""
    keep_checkpoint: bool = False
    """Keep `<out>/checkpoint/` after the run instead of deleting it."""
    log_every: int = 50
    """Steps between progress lines written to the log."""
    eval_max_blocks: int = 512
    """Most held-out blocks scored for `eval.json`."""
    max_output_mb: float | None = 25.0
    """Refuse a model whose bfloat16 weights would exceed this many megabytes; None for no limit."""

    def __post_init__(self) -> None:
        self.out, self.wordnet_dir = Path(self.out), Path(self.wordnet_dir)
        for name in _POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self._check_ranges()
        self._check_shapes()

    def _check_ranges(self) -> None:
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps must lie in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}"
            )
        if self.max_corpus_chars is not None and self.max_corpus_chars < 1:
            raise ConfigError(f"max_corpus_chars must be positive or None, got {self.max_corpus_chars}")

    def _check_shapes(self) -> None:
        smallest_vocab = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
        if self.vocab_size < smallest_vocab:
            raise ConfigError(f"vocab_size must be at least {smallest_vocab}, got {self.vocab_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must split into num_heads={self.num_heads} heads of even width"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.block_size > self.max_position_embeddings:
            raise ConfigError(
                f"block_size={self.block_size} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        megabytes = 2 * self.num_parameters() / 1e6
        if self.max_output_mb is not None and megabytes > self.max_output_mb:
            raise ConfigError(
                f"bfloat16 weights would take {megabytes:.1f} MB, over max_output_mb={self.max_output_mb}"
            )

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (embeddings are tied, so counted once)."""
        head_dim = self.hidden_size // self.num_heads
        attention = (
            2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * self.num_kv_heads * head_dim
        )
        layer = attention + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size
        return self.num_layers * layer + self.vocab_size * self.hidden_size + self.hidden_size

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-ready values (paths as strings)."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}


def model_config(config: PretrainConfig) -> LlamaConfig:
    """The Llama architecture described by `config`, with the tokenizer's special-token ids."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
    )


def train_tokenizer(
    documents: list[str], vocab_size: int, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; it adds no special tokens by itself (documents end with eos in training)."""
    raw = Tokenizer(models.BPE(unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )


def _lr_factor(config: PretrainConfig, step: int) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, progress))
    )


def _optimizer(model: PreTrainedModel, config: PretrainConfig) -> tuple[torch.optim.AdamW, LambdaLR]:
    params = list(model.parameters())  # tied embedding appears once
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
    return optimizer, LambdaLR(optimizer, lambda step: _lr_factor(config, step))


def _train_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    batch: torch.Tensor,
    config: PretrainConfig,
) -> float:
    """One optimizer step on `batch` (B, T); returns the mean next-token loss in nats."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss in nats over `blocks` (N, T), in the model's own dtype."""
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    return total / len(blocks)


def _check_resumable(root: Path, config: PretrainConfig) -> None:
    """Refuse to resume a checkpoint made with other training settings."""
    check_resumable(root, {k: v for k, v in config.to_json().items() if k not in _RUN_ONLY_FIELDS})


# ---- the run ----


def pretrain(config: PretrainConfig) -> Path:
    """Train tokenizer and model as `config` says, resuming from `<out>/checkpoint/`; returns `config.out`.

    The output directory loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
    and also holds `recipe.json` (settings, corpus sizes, tokens, wall time) and `eval.json` (held-out loss).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _pretrain(config)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _pretrain(config: PretrainConfig) -> Path:
    out, root = config.out, config.out / CHECKPOINT_DIR
    if (out / "recipe.json").exists() and not root.exists():
        raise ConfigError(f"{out} already holds a finished model; choose another output folder or delete it")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    _check_resumable(root, config)
    corpus = build_corpus(
        config.wordnet_dir,
        heldout_fraction=config.heldout_fraction,
        seed=config.seed,
        max_chars=config.max_corpus_chars,
        python_docs=config.python_docs,
        stdlib_docstrings=config.stdlib_docstrings,
    )
    tokenizer = _tokenizer_for(root, corpus, config)
    train_blocks = pack_blocks(tokenizer, corpus.train, config.block_size)
    heldout_blocks = pack_blocks(tokenizer, corpus.heldout, config.block_size)
    if len(train_blocks) == 0 or len(heldout_blocks) == 0:
        raise ConfigError(
            f"the corpus gives {len(train_blocks)} training and {len(heldout_blocks)} held-out blocks of "
            f"{config.block_size} tokens; raise max_corpus_chars={config.max_corpus_chars} or heldout_fraction"
        )
    model = AutoModelForCausalLM.from_config(model_config(config))
    optimizer, scheduler = _optimizer(model, config)
    start, extra = load_checkpoint(root, model, optimizer, scheduler)
    elapsed = float(extra.get("elapsed_s", 0.0))
    sampler = BlockSampler(train_blocks, config.batch_size, config.seed)
    elapsed, train_loss = _train_loop(model, optimizer, scheduler, sampler, config, start, elapsed)
    _write_model(out, model, tokenizer)
    scores = _evaluate(out, heldout_blocks[: config.eval_max_blocks], config.vocab_size)
    write_json(out / "eval.json", scores)
    sizes = {**corpus.sizes(), "train_tokens": train_blocks.numel(), "heldout_tokens": heldout_blocks.numel()}
    write_json(out / "recipe.json", _recipe(config, sizes, elapsed, train_loss))
    _check_size(out, config.max_output_mb)
    if not config.keep_checkpoint:
        shutil.rmtree(root)
    return out


def _tokenizer_for(root: Path, corpus: Corpus, config: PretrainConfig) -> PreTrainedTokenizerFast:
    """The run's tokenizer: trained on the first start and kept in the checkpoint folder for resumption."""
    path = root / "tokenizer"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer = train_tokenizer(corpus.train, config.vocab_size, config.max_position_embeddings)
    tokenizer.save_pretrained(path)
    return tokenizer


def _train_loop(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    sampler: BlockSampler,
    config: PretrainConfig,
    start: int,
    elapsed: float,
) -> tuple[float, float | None]:
    """Steps `start`..`config.steps`; returns total training seconds and the smoothed last loss."""
    root, tokens_per_step = config.out / CHECKPOINT_DIR, config.batch_size * config.block_size
    bar = tqdm(total=config.steps, initial=start, desc="pretrain", unit="step", mininterval=2.0)
    began, smooth = time.perf_counter(), None
    for step in range(start, config.steps):
        loss = _train_step(model, optimizer, scheduler, sampler.batch(step), config)
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        done, session = step + 1, time.perf_counter() - began
        rate = (done - start) * tokens_per_step / session
        bar.set_postfix(loss=f"{smooth:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update()
        if done % config.log_every == 0 or done == config.steps:
            lr = scheduler.get_last_lr()[0]
            bar.write(f"step {done}/{config.steps}  loss {smooth:.4f}  lr {lr:.2e}  {rate:,.0f} tokens/s")
        if done % config.checkpoint_every == 0 and done < config.steps:
            save_checkpoint(root, done, model, optimizer, scheduler, {"elapsed_s": elapsed + session})
    bar.close()
    return elapsed + time.perf_counter() - began, smooth


def _write_model(out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Save weights in bfloat16 (half the bytes; the shipped folder must stay small) plus the tokenizer."""
    model.bfloat16()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _evaluate(out: Path, blocks: torch.Tensor, vocab_size: int) -> dict[str, Any]:
    """Held-out scores of the saved (bfloat16) weights as users load them, upcast to fp32."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    loss = heldout_loss(model, blocks)
    return {
        "heldout_loss": loss,
        "heldout_perplexity": math.exp(loss),
        "uniform_baseline_perplexity": float(vocab_size),
        "heldout_tokens_scored": blocks.numel(),
        "heldout_blocks_scored": len(blocks),
        "weights_dtype": "bfloat16",
    }


def _recipe(
    config: PretrainConfig, sizes: dict[str, int], elapsed: float, train_loss: float | None
) -> dict[str, Any]:
    training_tokens = config.steps * config.batch_size * config.block_size
    return {
        "config": config.to_json(),
        "model": {"architecture": "llama", "parameters": config.num_parameters(), "tied_embeddings": True},
        "corpus": sizes,
        "training_tokens": training_tokens,
        "epochs": training_tokens / max(1, sizes["train_tokens"]),
        "wall_time_s": round(elapsed, 1),
        "tokens_per_s": round(training_tokens / max(elapsed, 1e-9)),
        "final_train_loss_smoothed": train_loss,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def _check_size(out: Path, max_mb: float | None) -> None:
    files = [
        path
        for path in out.rglob("*")
        if path.is_file() and CHECKPOINT_DIR not in path.relative_to(out).parts
    ]
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    if max_mb is not None and megabytes > max_mb:
        raise RuntimeError(f"{out} takes {megabytes:.1f} MB, over max_output_mb={max_mb}")

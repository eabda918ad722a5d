"""`splitprefix pretrain`: rebuild the built-in base model from the offline corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from splitprefix.pretraining.corpus import DEFAULT_WORDNET_DIR


def pretrain_command(
    out: Path = typer.Option(
        Path("runs/builtin"), help="Output model folder; re-running resumes its checkpoint."
    ),
    steps: int = typer.Option(1000, help="Optimizer steps (sets the cosine schedule's length)."),
    seed: int = typer.Option(0, help="Seed of the split, initial weights and batch order."),
    batch_size: int = typer.Option(32, help="Blocks of --block-size tokens per step."),
    block_size: int = typer.Option(128, help="Tokens per training block."),
    lr: float = typer.Option(1.5e-3, help="Peak learning rate."),
    warmup_steps: int = typer.Option(100, help="Linear warm-up steps before the cosine decay."),
    checkpoint_every: int = typer.Option(100, help="Steps between resumable checkpoints."),
    keep_checkpoint: bool = typer.Option(False, help="Keep OUT/checkpoint/ when done."),
    threads: int = typer.Option(2, help="CPU threads for torch."),
    bf16: bool = typer.Option(True, help="Train under bfloat16 autocast."),
    max_corpus_chars: int | None = typer.Option(None, help="Train on a random corpus subset this large."),
    wordnet_dir: Path = typer.Option(DEFAULT_WORDNET_DIR, help="Folder with WordNet's data.* files."),
) -> None:
    """Pretrain a small Llama and its tokenizer on WordNet glosses and Python docs; writes a model folder."""
    from splitprefix.pretraining.recipe import PretrainConfig, pretrain

    config = PretrainConfig(
        out=out,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        block_size=block_size,
        lr=lr,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        keep_checkpoint=keep_checkpoint,
        num_threads=threads,
        bf16=bf16,
        max_corpus_chars=max_corpus_chars,
        wordnet_dir=wordnet_dir,
    )
    typer.echo(str(pretrain(config)))

"""Causal-LM training blocks: documents packed into fixed-length token rows, and a resumable sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def pack_blocks(tokenizer: PreTrainedTokenizerFast, documents: list[str], block_size: int) -> torch.Tensor:
    """Token ids of all documents, each followed by eos, cut into blocks; the ragged tail is dropped."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos)
    usable = len(stream) // block_size * block_size
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, block_size)  # (N, block_size)


class BlockSampler:
    """Batches as a pure function of the step: each epoch walks a fresh seeded permutation of the blocks."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int) -> None:
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.blocks), generator=generator)}
        return self._orders[epoch]

    def batch(self, step: int) -> torch.Tensor:
        """The blocks of 0-based `step`, shape (batch_size, block_size)."""
        count = len(self.blocks)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        rows = [int(self._order(p // count)[p % count]) for p in positions]
        return self.blocks[rows]

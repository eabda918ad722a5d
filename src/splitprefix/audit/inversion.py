"""Learned inversion: a small network, trained by the attacker on public text, maps states to tokens.

The attacker runs public documents through the bottom layers it owns (without the data party's
prefix, at positions offset by the observed prefix length), privatises the states with the same
mechanism and settings, and fits an MLP whose output is scored against the model's own token
embeddings: logits = MLP(standardised state) @ E^T. Tying the output to E lets a few thousand
training tokens cover the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from splitprefix.audit.nearest import embedding_matrix
from splitprefix.data_party.privacy import PrivacyConfig, privatize
from splitprefix.errors import ConfigError
from splitprefix.model.split import Bottom, token_positions


@dataclass(frozen=True)
class InversionConfig:
    """How the attacker trains its inversion network."""

    train_tokens: int = 20_000
    """Public-text tokens whose layer-K states make the training set."""
    steps: int = 300
    """Adam steps."""
    batch_size: int = 512
    """Token states per step."""
    lr: float = 2e-3
    """Adam learning rate."""
    hidden: int = 512
    """Width of the MLP's hidden layer."""
    seq_len: int = 64
    """Tokens per public-text sequence run through the bottom."""
    seed: int = 0
    """Seed of the network's initialisation, the batches and the training noise."""

    def __post_init__(self) -> None:
        if min(self.train_tokens, self.steps, self.batch_size, self.hidden, self.seq_len) < 1:
            raise ConfigError(f"every size of the inversion attack must be >= 1; got {self}")


class Inverter(nn.Module):
    """State (..., d) -> token logits (..., V): a standardised MLP scored against the embeddings E."""

    embeddings: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, embeddings: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, width: int) -> None:
        super().__init__()
        d = embeddings.shape[1]
        self.register_buffer("embeddings", embeddings.detach().float().clone())  # (V, d)
        self.register_buffer("mean", mean)  # (d,)
        self.register_buffer("std", std)  # (d,)
        self.mlp = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        z = self.mlp((states - self.mean) / self.std)  # (..., d)
        e = F.normalize(self.embeddings, dim=-1)
        return self.scale * F.normalize(z, dim=-1) @ e.T  # (..., V)


def public_sequences(
    tokenizer: PreTrainedTokenizerBase, documents: list[str], config: InversionConfig
) -> torch.Tensor:
    """About `train_tokens` tokens of `documents`, as BOS-led rows (N, seq_len)."""
    bos = tokenizer.bos_token_id if isinstance(tokenizer.bos_token_id, int) else None
    body = config.seq_len - (bos is not None)
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if len(stream) >= config.train_tokens:
            break
    rows = [stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]
    if not rows:
        raise ConfigError(f"the public text has {len(stream)} tokens, fewer than one row of {body}")
    ids = torch.tensor(rows)  # (N, body)
    if bos is not None:
        ids = torch.cat([torch.full((len(rows), 1), bos), ids], dim=1)
    return ids


@torch.no_grad()
def attacker_states(
    bottom: Bottom, ids: torch.Tensor, offset: int, privacy: PrivacyConfig, batch: int = 32
) -> torch.Tensor:
    """Privatised layer-K states (N * T, d, fp32) of public rows `ids` (N, T), positions from `offset`,
    on the bottom's device."""
    seed = 0 if privacy.seed is None else privacy.seed + 1
    generator = torch.Generator().manual_seed(seed)  # the attacker's own noise, not the data party's
    device = embedding_matrix(bottom).device
    out = []
    for rows in ids.to(device).split(batch):
        mask = torch.ones_like(rows)
        x = bottom(rows, mask, token_positions(mask, offset))
        out.append(privatize(x.hidden.float(), mask, privacy, generator).flatten(0, 1))
    return torch.cat(out)


def train_inverter(
    bottom: Bottom,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    offset: int,
    privacy: PrivacyConfig,
    config: InversionConfig,
) -> Inverter:
    """Fit an `Inverter` to public text's privatised layer-K states at prefix offset `offset`.

    The attacker learns in fp32, whatever the bottom's dtype, on the bottom's device."""
    ids = public_sequences(tokenizer, documents, config)
    states = attacker_states(bottom, ids, offset, privacy)
    targets = ids.flatten().to(states.device)
    torch.manual_seed(config.seed)  # initialised on the CPU, so every device starts from the same network
    embeddings = embedding_matrix(bottom)
    model = Inverter(embeddings, states.mean(0), states.std(0).clamp(min=1e-6), config.hidden)
    model.to(states.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        pick = torch.randint(0, len(states), (config.batch_size,), generator=generator).to(states.device)
        loss = F.cross_entropy(model(states[pick]), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def invert(model: Inverter, states: torch.Tensor) -> torch.Tensor:
    """The most likely token (T,) for each state (T, d), on the inverter's device."""
    return model(states.to(model.embeddings.device, torch.float32)).argmax(-1)

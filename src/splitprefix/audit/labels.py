"""What head=server reveals: the data party's target tokens, which its loss requests carry.

Since protocol 2 the server computes the head=server loss itself, so each training request holds
`targets` (B, T) in the clear. The attacker reads them off the request; this measures that the
data party's own code sends exactly its labels.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from splitprefix.audit.observe import LocalTop
from splitprefix.data.batching import IGNORE_INDEX, EncodedExample, collate
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.split_forward import split_loss_fn
from splitprefix.evaluation.metrics import next_token_targets
from splitprefix.model.split import Bottom


def label_recovery(
    model: PreTrainedModel,
    bottom: Bottom,
    encoded: list[EncodedExample],
    kv: torch.Tensor,
    split_at: int,
    pad_id: int,
    privacy: HiddenPrivacy | None = None,
    batch_size: int = 16,
) -> dict[str, float | int]:
    """Fraction of supervised target tokens that the model party reads off head=server requests."""
    top = LocalTop(model, split_at, head="server")
    loss_fn = split_loss_fn(bottom, top, None, split_at, privacy)
    hits, total = 0, 0
    trainable = kv.detach().requires_grad_(True)  # a training step: the data party asks for gradients
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        top.seen_targets.clear()
        loss, _ = loss_fn(batch, trainable)
        loss.backward()
        truth = next_token_targets(batch.labels)
        supervised = truth != IGNORE_INDEX
        seen = torch.cat(top.seen_targets) if top.seen_targets else torch.full_like(truth, IGNORE_INDEX)
        hits += int((seen[supervised] == truth[supervised]).sum())
        total += int(supervised.sum())
    return {"recovery": hits / max(total, 1), "n_targets": total}

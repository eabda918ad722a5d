"""What head=server reveals: the data party's target tokens, read off the logit gradients.

With head=server the data party sends back `grad_output = d loss / d logits` (N, V) for the N
supervised positions. For a cross-entropy loss that row is softmax(logits) - onehot(target): its
only negative entry is the target token. The attacker takes each row's argmin.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from splitprefix.audit.observe import LocalTop
from splitprefix.data.batching import EncodedExample, collate
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.split_train import next_token_targets, split_loss_fn
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
    """Fraction of supervised target tokens that the argmin of the logit gradients recovers."""
    top = LocalTop(model, split_at, head="server")
    top.record_grads = True
    loss_fn = split_loss_fn(bottom, top, None, split_at, privacy)
    hits, total = 0, 0
    trainable = kv.detach().requires_grad_(True)  # a training step: the data party asks for gradients
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        top.logit_grads.clear()
        loss, _ = loss_fn(batch, trainable)
        loss.backward()
        _, targets = next_token_targets(batch.labels)
        guesses = torch.cat(top.logit_grads).argmin(-1)  # (N,)
        hits += int((guesses == targets).sum())
        total += int(targets.numel())
    return {"recovery": hits / max(total, 1), "n_targets": total}

"""Running a model, whole or split, with a deep prefix as its key/value cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from splitprefix.model.prefix import prefix_cache, split_kv
from splitprefix.model.registry import architecture_of
from splitprefix.model.split import SplitParts, extend_mask, token_positions


def _prefix_len(kv: torch.Tensor | None) -> int:
    return 0 if kv is None else kv.shape[3]


def _placed(
    model: PreTrainedModel, input_ids: torch.Tensor, token_mask: torch.Tensor, kv: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs on the model's device, and the fp32 prefix cast to its dtype (the cast keeps gradients)."""
    device = model.device
    kv = None if kv is None else kv.to(device, model.dtype)
    return input_ids.to(device), token_mask.to(device), kv


def forward_with_prefix(
    model: PreTrainedModel, input_ids: torch.Tensor, token_mask: torch.Tensor, kv: torch.Tensor | None
) -> torch.Tensor:
    """Whole-model logits (B, T, V) with `kv` (L, 2, n_kv, P, head_dim) as a prefix; None = base model.

    Positions count real tokens from P, as PEFT's prefix tuning does for unpadded and right-padded
    batches, and left padding does not shift them.
    """
    p = _prefix_len(kv)
    input_ids, token_mask, kv = _placed(model, input_ids, token_mask, kv)
    cache = None if kv is None else prefix_cache(kv, model.config, input_ids.shape[0])
    out = model(
        input_ids=input_ids,
        attention_mask=extend_mask(token_mask, p),
        position_ids=token_positions(token_mask, p),
        cache=cache,
        use_cache=cache is not None,
    )
    return out.logits


def hidden_with_prefix(
    model: PreTrainedModel, input_ids: torch.Tensor, token_mask: torch.Tensor, kv: torch.Tensor | None
) -> torch.Tensor:
    """The whole model's final hidden states (B, T, d), after its final norm, from its own decoder
    (`forward_with_prefix` without the LM head): for a loss that needs logits at a few rows only."""
    p = _prefix_len(kv)
    input_ids, token_mask, kv = _placed(model, input_ids, token_mask, kv)
    cache = None if kv is None else prefix_cache(kv, model.config, input_ids.shape[0])
    out = architecture_of(model.config).backbone_of(model)(
        input_ids=input_ids,
        attention_mask=extend_mask(token_mask, p),
        position_ids=token_positions(token_mask, p),
        cache=cache,
        use_cache=cache is not None,
    )
    return out.last_hidden_state


def forward_split(
    parts: SplitParts, input_ids: torch.Tensor, token_mask: torch.Tensor, kv: torch.Tensor | None
) -> torch.Tensor:
    """Logits (B, T, V) of bottom -> top (-> head), in one process, with the same prefix handling."""
    p = _prefix_len(kv)
    config = parts.bottom.stack.config
    split_at = parts.top.stack.start
    batch = input_ids.shape[0]
    bottom_cache: DynamicCache | None = None
    top_cache: DynamicCache | None = None
    if kv is not None:
        bottom_kv, top_kv = split_kv(kv, split_at)
        bottom_cache = prefix_cache(bottom_kv, config, batch)
        top_cache = prefix_cache(top_kv, config, batch, first_layer=split_at)
    x = parts.bottom(input_ids, extend_mask(token_mask, p), token_positions(token_mask, p), bottom_cache)
    out = parts.top(x, top_cache)
    return out if parts.head is None else parts.head(out)


@torch.no_grad()
def generate_with_prefix(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    kv: torch.Tensor | None,
    max_new_tokens: int,
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) of left-padded prompts, with `kv` as the prefix.

    Uses Hugging Face `generate` with the prefix seeded into its cache, since PEFT's own `generate`
    ignores a prefix under transformers 5. Rows that hit EOS are padded with `pad_token_id`.
    """
    p = _prefix_len(kv)
    input_ids, token_mask, kv = _placed(model, input_ids, token_mask, kv)
    cache = None if kv is None else prefix_cache(kv, model.config, input_ids.shape[0])
    out = model.generate(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=extend_mask(token_mask, p),
        cache=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    return out[:, input_ids.shape[1] :]

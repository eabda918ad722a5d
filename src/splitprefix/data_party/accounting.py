"""(epsilon, delta) of the clipped, noised layer-K states, by Rényi DP (opacus's RDP accountant).

Neighbouring data sets: one example replaced by another with the same number of real tokens (the
attention mask, which crosses the wire in clear, gives every example's length away, so lengths are
not protected).

One release of an example sends its T real tokens' states. `privatize` scales each state to L2
norm at most C, so each lies in the ball of radius C and a replaced example moves each by at most
2C: the L2 sensitivity of the (T * d)-vector sent is 2C * sqrt(T). The noise is N(0, (sigma C)^2)
per coordinate, so one release is the Gaussian mechanism with noise multiplier
sigma C / (2C sqrt(T)) = sigma / (2 sqrt(T)), and R such token states in all, over every release
of the example (each training epoch, each evaluation, each token generated), compose to the
Gaussian mechanism with sigma / (2 sqrt(R)); Rényi DP composes adaptively, so this holds even
though later requests depend on earlier answers. No sampling amplification is claimed: batches are
drawn by shuffling, not by Poisson sampling.

Not covered: the gradients the model party sends back and the prefix the data party sends for
layers [K, L) (both are computed from the labels and the clear states), the bottom prefix (trained on
the same data, it shifts every later state), the attention mask and positions (lengths, padding),
and with head=server the targets, which travel in clear.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from splitprefix.data.batching import EncodedExample, encode_examples, prompt_batch
from splitprefix.data.formats import Example
from splitprefix.data_party.privacy import PrivacyConfig
from splitprefix.errors import ConfigError
from splitprefix.evaluation.evaluate import EvalConfig, generation_budget
from splitprefix.extras import require

if TYPE_CHECKING:
    from splitprefix.data_party.split_train import SplitTrainConfig
    from splitprefix.data_party.train import TrainConfig

DEFAULT_DELTA = 1e-5
"""delta of the reported (epsilon, delta): keep it well below 1 / (examples in the data set)."""
ORDERS = [1.0 + x for x in np.logspace(-5, 6, 500).tolist()]
"""Rényi orders searched for the best conversion; wide, because epsilon here ranges from 1e-3 to 1e8."""
NEIGHBOURS = (
    "one example replaced by another with the same token count; each token's state clipped to C, "
    "so one release of T tokens has L2 sensitivity 2C*sqrt(T)"
)
NOT_COVERED = (
    "the gradients sent back, the upper layers' prefix sent with every request, the bottom prefix "
    "(trained on the data), the attention mask and positions, and head=server's targets"
)


def gaussian_epsilon(noise_multiplier: float, token_releases: int, delta: float = DEFAULT_DELTA) -> float:
    """epsilon at `delta` for one example whose states left `token_releases` times in all (tokens x releases).

    Composes the releases as one Gaussian mechanism of noise multiplier sigma / (2 sqrt(R)) with
    opacus's RDP accountant (sample rate 1); infinite without noise, 0 for an example never sent.
    """
    if token_releases < 0 or not 0 < delta < 1:
        raise ConfigError(f"need token_releases >= 0 and 0 < delta < 1; got {token_releases}, {delta}")
    if token_releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    # opacus (and the scipy it pulls) only when there is noise to account for
    accountant = require("opacus.accountants", "the privacy accounting of noised states").RDPAccountant()
    accountant.history.append((noise_multiplier / (2 * math.sqrt(token_releases)), 1.0, 1))
    return float(accountant.get_epsilon(delta, alphas=ORDERS))


def training_releases(lengths: Sequence[int], batch_size: int, micro_batches: int) -> int:
    """The most token states any one training example sends in `micro_batches` batches of `batch_size`.

    Batches are drawn epoch by epoch, each example once per epoch (`batches_forever`), so an
    example is sent at most ceil(micro_batches / batches per epoch) times, each time its
    `lengths[i]` tokens.
    """
    if not lengths:
        return 0
    per_epoch = math.ceil(len(lengths) / batch_size)
    return math.ceil(micro_batches / per_epoch) * max(lengths)


def evaluation_releases(
    loss_lengths: Sequence[int], prompt_lengths: Sequence[int], loss_passes: int, new_tokens: int
) -> int:
    """The most token states any one held-out example sends in `loss_passes` loss evaluations of its
    `loss_lengths[i]` tokens, plus, when `new_tokens` > 0, one exact-match generation from its
    prompt of `prompt_lengths[i]` tokens (0 = no prompt).

    Exact match generates through the split with the server's KV cache (`generation_releases`).
    """
    worst = 0
    for i, length in enumerate(loss_lengths):
        prompt = prompt_lengths[i] if i < len(prompt_lengths) else 0
        generated = generation_releases(prompt, new_tokens) if prompt and new_tokens else 0
        worst = max(worst, loss_passes * length + generated)
    return worst


def generation_releases(prompt_tokens: int, new_tokens: int) -> int:
    """Token states one prompt sends while generating `new_tokens` with the server's KV cache:
    the prompt at prefill, then one per new token but the last (which is never sent)."""
    return prompt_tokens + max(new_tokens - 1, 0)


def privacy_report(
    privacy: PrivacyConfig | None, releases: dict[str, int], delta: float = DEFAULT_DELTA
) -> dict[str, Any] | None:
    """The (epsilon, delta) record of a run, for its report and saved config; None without the option.

    `releases` names groups of examples (e.g. "train", "held_out") with the most token states any
    example of the group sent; epsilon is the worst group's, and None (no guarantee) without noise.
    """
    if privacy is None or not privacy.enabled:
        return None
    worst = max(releases.values(), default=0)
    epsilon = gaussian_epsilon(privacy.noise_multiplier, worst, delta)
    return {
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "delta": delta,
        "token_releases": releases,
        "accountant": "opacus RDP, Gaussian mechanism, sample rate 1",
        "neighbours": NEIGHBOURS,
        "not_covered": NOT_COVERED,
    }


def held_out_releases(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], config: EvalConfig, loss_passes: int
) -> int:
    """`evaluation_releases` of `evaluate(..., config)` run `loss_passes` times, the last with exact
    match when `config.exact_match`."""
    if not examples:
        return 0
    lengths = [len(e) for e in encode_examples(tokenizer, examples, config.max_length)]
    prompted = [e for e in examples if e.prompt]
    if not (config.exact_match and prompted):
        return evaluation_releases(lengths, [], loss_passes, 0)
    prompts = [
        int(prompt_batch(tokenizer, [e.prompt], "left", config.max_length).attention_mask.sum())
        if e.prompt
        else 0
        for e in examples
    ]
    return evaluation_releases(lengths, prompts, loss_passes, generation_budget(tokenizer, prompted, config))


def run_privacy(
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[EncodedExample],
    held_out: list[Example],
    config: SplitTrainConfig,
    train: TrainConfig,
    evaluations: int,
) -> dict[str, Any] | None:
    """`privacy_report` of a split training run: its training forwards, its `evaluations` held-out
    loss passes during training and its final evaluation with exact match.

    The held-out slice of the training file shares no example with training; a separate
    `eval_data` file may, so then the worst example is also counted as in both.
    """
    if config.privacy is None or not config.privacy.enabled:
        return None
    releases = {
        "train": training_releases(
            [len(e) for e in encoded], train.batch_size, train.steps * train.grad_accum
        )
    }
    if held_out:
        eval_config = EvalConfig(max_length=config.max_length, exact_match=config.exact_match)
        releases["held_out"] = held_out_releases(tokenizer, held_out, eval_config, evaluations + 1)
        if config.eval_data is not None:
            releases["in_both_files"] = releases["train"] + releases["held_out"]
    return privacy_report(config.privacy, releases)

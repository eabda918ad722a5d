"""FedAvg of prefixes: the joint prefix is each party's prefix weighted by the examples it trained on.

Flower's `FedAvg(weighted_by_key="num-examples")` does this sum on the server; `weighted_average`
is the same math in torch, with user-facing errors, so that tests and tools can check it.
"""

from __future__ import annotations

import torch

from splitprefix.errors import ConfigError, ShapeMismatchError


def weighted_average(prefix_kvs: list[torch.Tensor], num_examples: list[int]) -> torch.Tensor:
    """sum_i n_i * kv_i / sum_i n_i, computed in float64 and returned in the first prefix's dtype.

    Every kv is (L, 2, n_kv, P, head_dim); `num_examples[i]` is party i's example count this round.
    """
    if not prefix_kvs:
        raise ConfigError("weighted_average needs at least one prefix; got none")
    if len(prefix_kvs) != len(num_examples):
        raise ConfigError(f"got {len(prefix_kvs)} prefixes but {len(num_examples)} example counts")
    bad = [n for n in num_examples if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ConfigError(f"every example count must be an int >= 1; got {list(num_examples)}")
    shape = tuple(prefix_kvs[0].shape)
    for i, kv in enumerate(prefix_kvs):
        if tuple(kv.shape) != shape:
            raise ShapeMismatchError(
                f"every prefix must have party 0's shape {shape}; party {i} has {tuple(kv.shape)}"
            )
    total = sum(num_examples)
    joint = torch.zeros(shape, dtype=torch.float64)
    for kv, n in zip(prefix_kvs, num_examples, strict=True):
        joint += kv.detach().to(torch.float64) * (n / total)
    return joint.to(prefix_kvs[0].dtype)

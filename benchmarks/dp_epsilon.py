"""(epsilon, delta) of one training example under `--noise SIGMA`, from the accountant alone.

What `train` would report for a run of `--steps` batches of `--batch-size` over `--data`, at each
sigma, without training: the worst example's token releases (`training_releases`) composed by
`gaussian_epsilon`. Also the sigma that each `--target-epsilon` needs, by bisection.

    python benchmarks/dp_epsilon.py --data data/party-0.jsonl --steps 50 --batch-size 16 \
        --noise 0.1 0.5 --target-epsilon 8 1
"""

from __future__ import annotations

import argparse
import json

from splitprefix.data.batching import encode_examples
from splitprefix.data.formats import load_jsonl
from splitprefix.data_party.accounting import DEFAULT_DELTA, gaussian_epsilon, training_releases
from splitprefix.model.loading import load_tokenizer


def sigma_for(target: float, releases: int, delta: float) -> float:
    """The smallest sigma (to 0.1%) whose epsilon is at most `target`."""
    low, high = 1e-3, 1e4
    while high / low > 1.001:
        middle = (low * high) ** 0.5
        low, high = (low, middle) if gaussian_epsilon(middle, releases, delta) <= target else (middle, high)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="builtin", help="Model directory whose tokenizer counts the tokens."
    )
    parser.add_argument("--data", required=True, help="Training JSONL file.")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--target-epsilon", type=float, nargs="*", default=[8.0, 1.0])
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA)
    args = parser.parse_args()
    encoded = encode_examples(load_tokenizer(args.model), load_jsonl(args.data), args.max_length)
    lengths = [len(example) for example in encoded]
    releases = training_releases(lengths, args.batch_size, args.steps)
    report = {
        "setup": vars(args),
        "examples": len(lengths),
        "longest_tokens": max(lengths),
        "worst_token_releases": releases,
        "epsilon": {str(s): gaussian_epsilon(s, releases, args.delta) for s in args.noise},
        "sigma_for_epsilon": {
            str(e): round(sigma_for(e, releases, args.delta), 2) for e in args.target_epsilon
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

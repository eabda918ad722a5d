"""Baseline: prefix-tune a base model on the synthetic customer-service task, whole model, no split.

Prints JSON with held-out loss and exact_match before (no prefix), along the way (every
`--eval-every` steps) and after prefix tuning, plus exact match on 200 training examples. Every
later stage (emulator, split training, federation) compares against these numbers.

    python benchmarks/prefix_tuning_baseline.py --model builtin
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.train import StepHooks, TrainConfig, fit_prefix
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--prefix-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-every", type=int, default=500, help="held-out evaluations along the way; 0: none"
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    model, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    train, test = make_task(SyntheticTaskConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed))
    eval_config = EvalConfig()

    start = time.perf_counter()
    before = evaluate(model, tokenizer, test, None, eval_config)
    train_config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, eval_every=args.eval_every
    )
    prefix_config = PrefixConfig.for_model(model.config, args.prefix_len)

    def held_out(prefix: Prefix) -> dict[str, float]:
        report = evaluate(model, tokenizer, test, prefix().detach(), eval_config)
        return {k: report[k] for k in ("loss", "exact_match")}

    prefix, history = fit_prefix(
        model, tokenizer, train, prefix_config, train_config, hooks=StepHooks(evaluate=held_out)
    )
    after = evaluate(model, tokenizer, test, prefix().detach(), eval_config)
    on_train = evaluate(model, tokenizer, train[:200], prefix().detach(), eval_config)

    print(
        json.dumps(
            {
                "benchmark": "prefix_tuning_baseline",
                "model": args.model,
                "config": vars(args),
                "n_train": len(train),
                "n_test": len(test),
                "no_prefix": {k: before[k] for k in ("loss", "perplexity", "exact_match")},
                "prefix_tuned": {k: after[k] for k in ("loss", "perplexity", "exact_match")},
                "train_exact_match_200": on_train["exact_match"],
                "train_loss_first_last": [history.losses[0], history.losses[-1]],
                "held_out_along_the_way": history.evals,
                "samples": after["samples"][:3],
                "wall_s": round(time.perf_counter() - start, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

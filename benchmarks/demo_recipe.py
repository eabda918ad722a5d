"""The demo's recipe search: whole-model prefix tuning on the demo's task at the demo's budget.

The central reference of `splitprefix demo` (1,200 training examples, 100 held-out, seed 0), with one
setting changed per run: what the federated prefix could at best reach with that setting, since
split training and FedAvg of the same steps match the whole model's training. Prints one JSON line:
the settings, the training wall time, held-out loss and exact match.

    python benchmarks/demo_recipe.py --steps 180 --batch-size 8 --lr 0.1 --prefix-len 16
    python benchmarks/demo_recipe.py --init-text "Intent: refund cancel ..."  # real-token init
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from splitprefix.data.batching import encode_examples, resolve_pad_id
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.train import TrainConfig, fit_prefix, local_loss_fn, train_prefix
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import Prefix, PrefixConfig


def real_token_kv(model: torch.nn.Module, tokenizer, text: str, length: int) -> torch.Tensor:
    """The model's own keys/values of the first `length` tokens of `text`, (L, 2, n_kv, P, hd): a prefix
    that starts as that text placed before every prompt."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] != length:
        raise SystemExit(f"--init-text has {ids.shape[1]} tokens; --prefix-len asks for {length}")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).float()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--init-std", type=float, default=1.0)
    parser.add_argument("--init-text", default="", help="Start from the model's keys/values of this text.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    train, test = make_task(SyntheticTaskConfig(n_train=1200, n_test=100, seed=args.seed))
    model, tokenizer = load_causal_lm("builtin"), load_tokenizer("builtin")
    torch.manual_seed(args.seed)
    prefix_config = PrefixConfig.for_model(model.config, args.prefix_len, init_std=args.init_std)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=0,
        seed=args.seed,
        checkpoint_every=0,
    )
    start = time.perf_counter()
    if args.init_text:
        prefix = Prefix(prefix_config, real_token_kv(model, tokenizer, args.init_text, args.prefix_len))
        encoded = encode_examples(tokenizer, train, 128)
        train_prefix(prefix, local_loss_fn(model), encoded, resolve_pad_id(tokenizer), config, desc="recipe")
    else:
        prefix, _ = fit_prefix(model, tokenizer, train, prefix_config, config, desc="recipe")
    train_s = time.perf_counter() - start
    report = evaluate(model, tokenizer, test, prefix().detach(), EvalConfig(max_length=128, exact_match=True))
    result = {**vars(args), "train_s": round(train_s, 1), "loss": round(report["loss"], 3)}
    print(json.dumps(result | {"exact_match": report["exact_match"]}))


if __name__ == "__main__":
    main()

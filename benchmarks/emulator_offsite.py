"""Emulator benchmark: cost of a training step on the emulator versus the full model, and how much of
the full-model prefix-tuning gain an offsite-trained, integrated prefix recovers.

Everything runs on the shipped base model and the synthetic customer-service task, in one process,
so the ratios compare measurements taken side by side. Prints JSON.

    python benchmarks/emulator_offsite.py --split-at 2 --keep 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from splitprefix.data.batching import collate, encode_examples, resolve_pad_id
from splitprefix.data.blocks import pack_blocks
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.train import TrainConfig, fit_prefix
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.evaluation.metrics import token_loss_sum
from splitprefix.model.emulator import integrate_kv
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import PrefixConfig
from splitprefix.model.prefixed import forward_with_prefix
from splitprefix.model_party.compress import DistillConfig, build_emulator, distill, make_manifest
from splitprefix.model_party.teacher import LoadedTeacher


def step_cost(model, batch, prefix_len: int, reps: int) -> dict[str, float]:
    """Median seconds of one prefix-training step, and bytes of weights plus saved activations."""
    kv = torch.zeros(PrefixConfig.for_model(model.config, prefix_len).kv_shape, requires_grad=True)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, n = token_loss_sum(
                forward_with_prefix(model, batch.input_ids, batch.attention_mask, kv), batch.labels
            )
        (loss / n).backward()
        if rep:  # the first repetition warms up
            times.append(time.perf_counter() - start)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "step_s": statistics.median(times),
        "weight_bytes": weights,
        "activation_bytes": sum(saved) / (reps + 1),
    }


def distill_corpus(tokenizer, max_chars: int) -> torch.Tensor:
    """General text for distillation: the pretraining corpus sources, or Python's docs without WordNet."""
    from splitprefix.pretraining import corpus

    try:
        documents = corpus.build_corpus(max_chars=max_chars, seed=1).train
    except corpus.WordNetMissingError:
        documents = corpus.python_topic_documents() + corpus.stdlib_docstring_documents()
    return pack_blocks(tokenizer, documents, 128)


def recovery(base: float, plug: float, ref: float) -> float | None:
    return None if ref == base else round((plug - base) / (ref - base), 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--distill-steps", type=int, default=DistillConfig.steps, help="Default: emulate's.")
    parser.add_argument("--distill-chars", type=int, default=3_000_000)
    parser.add_argument("--cost-reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    full, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    train, test = make_task(SyntheticTaskConfig(n_train=2000, n_test=300, seed=args.seed))
    train_config = TrainConfig(steps=args.steps, lr=args.lr, batch_size=16, seed=args.seed)
    prefix_config = PrefixConfig.for_model(full.config, args.prefix_len)
    evaluation = EvalConfig()
    result: dict[str, Any] = {"benchmark": "emulator_offsite", "config": vars(args)}

    emulator, kept = build_emulator(full, args.split_at, args.keep)
    manifest = make_manifest(args.model, full, tokenizer, args.split_at, kept)
    batch = collate(encode_examples(tokenizer, train[:16], 128), resolve_pad_id(tokenizer))
    full_cost, emu_cost = (
        step_cost(full, batch, args.prefix_len, args.cost_reps),
        step_cost(emulator, batch, args.prefix_len, args.cost_reps),
    )
    result["cost"] = {
        "full": full_cost,
        "emulator": emu_cost,
        "step_time_ratio_emulator_over_full": round(emu_cost["step_s"] / full_cost["step_s"], 3),
        "memory_ratio_emulator_over_full": round(
            (emu_cost["weight_bytes"] + emu_cost["activation_bytes"])
            / (full_cost["weight_bytes"] + full_cost["activation_bytes"]),
            3,
        ),
        "kept_layers": kept,
    }

    def score(kv):
        report = evaluate(full, tokenizer, test, kv, evaluation)
        return {"loss": round(report["loss"], 4), "exact_match": report["exact_match"]}

    base = score(None)
    reference, _ = fit_prefix(full, tokenizer, train, prefix_config, train_config, desc="reference")
    ref = score(reference().detach())
    result["full_model"] = {"no_prefix": base, "reference_prefix": ref}

    variants = {"layer_drop": None, "distilled": DistillConfig(steps=args.distill_steps, seed=args.seed)}
    for name, distill_config in variants.items():
        entry: dict[str, Any] = {}
        if distill_config is not None:
            entry["distillation"] = distill(
                LoadedTeacher(full, args.split_at),
                emulator,
                args.split_at,
                distill_corpus(tokenizer, args.distill_chars),
                distill_config,
                layer_map=manifest.layer_map,
            )
        emu_prefix_config = PrefixConfig.for_model(emulator.config, args.prefix_len)
        start = time.perf_counter()
        prefix, _ = fit_prefix(
            emulator, tokenizer, train, emu_prefix_config, train_config, desc=f"offsite {name}"
        )
        entry["offsite_train_s"] = round(time.perf_counter() - start, 1)
        entry["on_emulator"] = {
            k: round(v, 4)
            for k, v in evaluate(emulator, tokenizer, test, prefix().detach(), evaluation).items()
            if k in ("loss", "exact_match")
        }
        for mode in ("stand-in", "zeros"):
            plugged = score(integrate_kv(prefix().detach(), manifest, mode))
            plugged["em_recovery"] = recovery(base["exact_match"], plugged["exact_match"], ref["exact_match"])
            plugged["loss_recovery"] = recovery(base["loss"], plugged["loss"], ref["loss"])
            entry[f"integrated_{mode}"] = plugged
        result[name] = entry
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

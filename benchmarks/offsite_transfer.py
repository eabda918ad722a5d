"""Offsite transfer on real text: how much of the whole-model prefix-tuning gain an integrated
offsite prefix carries, for each emulator recipe, on real held-out text. Prints JSON.

For each seed and corpus (`benchmarks/real_text.py`: manual pages, GNU info manuals) it measures
the full model's held-out completion loss with no prefix, with the reference prefix (trained on the
whole model) and with each recipe's offsite prefix (trained on that recipe's emulator, then mapped
onto all L layers by each dropped-layer mapping), all at the same steps, lr, batch and prefix
length. The emulators are distilled on the vendor's general corpus only (the built-in model's
pretraining text); no recipe sees the data party's text.

    nice -n 10 python benchmarks/offsite_transfer.py --seeds 0 1 2 --recipes layer_drop prefix_both
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from real_text import CORPORA, corpus
from transformers import AutoModelForCausalLM

from splitprefix.data.blocks import pack_blocks
from splitprefix.data.formats import Example
from splitprefix.data_party.train import TrainConfig, fit_prefix
from splitprefix.evaluation.evaluate import EvalConfig, evaluate_loss
from splitprefix.model.emulator import EmulatorManifest, integrate_kv
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefix import PrefixConfig
from splitprefix.model.registry import config_keeping_layers
from splitprefix.model_party.compress import (
    DistillConfig,
    _original_name,
    distill,
    kept_layers,
    make_manifest,
)
from splitprefix.model_party.teacher import LoadedTeacher


@dataclass(frozen=True)
class Recipe:
    """How one emulator is built: which layers it keeps and how (if at all) it is distilled."""

    distill: DistillConfig | None = None
    """Distillation settings; None = plain layer drop."""
    kept_upper: tuple[int, ...] | None = None
    """Original upper layers kept; None = uniform layer drop."""
    per_layer: bool = False
    """Also match, after each kept upper layer but the last, the full model's hidden state at the
    end of the block of layers it stands in for (`distill_per_layer`, this benchmark's only)."""
    notes: dict[str, Any] = field(default_factory=dict)


def _d(**kw: Any) -> DistillConfig:
    return DistillConfig(**{"steps": 300, "checkpoint_every": 0, **kw})


RECIPES: dict[str, Recipe] = {
    "layer_drop": Recipe(),
    "hidden": Recipe(_d(loss="hidden")),
    "logits": Recipe(_d(loss="logits")),
    "both": Recipe(_d(loss="both")),
    "hidden_1000": Recipe(_d(loss="hidden", steps=1000)),
    "prefix_hidden": Recipe(_d(loss="hidden", prefix_len=16)),
    "prefix_logits": Recipe(_d(loss="logits", prefix_len=16)),
    "prefix_both": Recipe(_d(loss="both", prefix_len=16)),
    "prefix_both_lr1e-3": Recipe(_d(loss="both", prefix_len=16, lr=1e-3)),
    "prefix_both_1000": Recipe(_d(loss="both", prefix_len=16, steps=1000)),
    "prefix_both_1000_lr1e-3": Recipe(_d(loss="both", prefix_len=16, steps=1000, lr=1e-3)),
    "prefix_both_100": Recipe(_d(loss="both", prefix_len=16, steps=100, lr=1e-3)),
    "prefix_hidden_100": Recipe(_d(loss="hidden", prefix_len=16, steps=100, lr=1e-3)),
    "both_100": Recipe(_d(loss="both", steps=100, lr=1e-3)),
    "hidden_100": Recipe(_d(loss="hidden", steps=100, lr=1e-3)),
    "logits_100": Recipe(_d(loss="logits", steps=100, lr=1e-3)),
    "both_400": Recipe(_d(loss="both", steps=400, lr=1e-3)),
    "both_1000": Recipe(_d(loss="both", steps=1000, lr=1e-3)),
    "per_layer_100": Recipe(_d(loss="both", steps=100, lr=1e-3), per_layer=True),
    "prefix_both_100_keep_3_7": Recipe(_d(loss="both", prefix_len=16, steps=100, lr=1e-3), kept_upper=(3, 7)),
    "prefix_both_std2": Recipe(_d(loss="both", prefix_len=16, prefix_std=2.0)),
    "keep_2_7": Recipe(kept_upper=(2, 7)),
    "keep_4_7": Recipe(kept_upper=(4, 7)),
    "keep_3_7": Recipe(kept_upper=(3, 7)),
    "prefix_both_keep_4_7": Recipe(_d(loss="both", prefix_len=16), kept_upper=(4, 7)),
}
MAPPINGS = ("stand-in", "zeros", "interpolate", "fitted")


def interpolate_kv(kv: torch.Tensor, manifest: EmulatorManifest) -> torch.Tensor:
    """Emulator-layout prefix onto all L layers: a dropped layer between two kept upper layers takes
    the linear interpolation of their prefixes; one outside them, its stand-in's."""
    upper = manifest.kept_layers[manifest.split_at :]
    layers = []
    for layer, source in enumerate(manifest.layer_map):
        below = [j for j, orig in enumerate(upper) if orig <= layer]
        above = [j for j, orig in enumerate(upper) if orig >= layer]
        if layer < manifest.split_at or not below or not above:
            layers.append(kv[source])
            continue
        a, b = below[-1], above[0]
        if a == b:
            layers.append(kv[manifest.split_at + a])
            continue
        w = (layer - upper[a]) / (upper[b] - upper[a])
        layers.append((1 - w) * kv[manifest.split_at + a] + w * kv[manifest.split_at + b])
    return torch.stack(layers)


def build(full, kept: list[int]):
    """The emulator of `full` keeping original layers `kept` (a copy; distillation trains it)."""
    emulator = AutoModelForCausalLM.from_config(
        config_keeping_layers(full.config, kept), attn_implementation=full.config._attn_implementation
    )
    source, originals = _original_name(full.config, kept), full.state_dict()
    emulator.load_state_dict({n: originals[source(n)].clone() for n in emulator.state_dict()}, strict=True)
    emulator.requires_grad_(False)
    return emulator.eval()


def distill_per_layer(full, emulator, layer_map: list[int], split_at: int, blocks, config) -> dict:
    """Distil the emulator's upper layers on logits (KL) and the normed final hidden states (MSE), as
    `distill` does, plus the normed hidden state after each kept upper layer but the last against
    the full model's after the last original layer it stands in for (MSE)."""
    import torch.nn.functional as F

    ends = {j: max(o for o, e in enumerate(layer_map) if e == j) for j in set(layer_map) if j >= split_at}
    pairs = [(j + 1, ends[j] + 1) for j in sorted(ends)[:-1]]  # (student, teacher) hidden_states indices
    from splitprefix.model.registry import architecture_of
    from splitprefix.model.split import Head

    norm = Head(full).norm
    upper = torch.nn.ModuleList(architecture_of(emulator.config).layers_of(emulator)[split_at:])
    upper.requires_grad_(True)
    optimizer = torch.optim.AdamW(upper.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))
    train, start = blocks[: -config.eval_blocks], time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
        with torch.no_grad():
            t = full(input_ids=batch, output_hidden_states=True)
        s = emulator(input_ids=batch, output_hidden_states=True)
        loss = F.kl_div(
            F.log_softmax(s.logits, -1).flatten(0, 1),
            F.log_softmax(t.logits, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        ) + F.mse_loss(s.hidden_states[-1], t.hidden_states[-1])
        for si, ti in pairs:
            loss = loss + F.mse_loss(norm(s.hidden_states[si]), norm(t.hidden_states[ti]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
    upper.requires_grad_(False)
    from splitprefix.model_party.teacher import lm_perplexity

    held_out = blocks[-config.eval_blocks :]
    return {
        "pairs": pairs,
        "full_perplexity": lm_perplexity(full, held_out),
        "emulator_perplexity_after": lm_perplexity(emulator, held_out),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def fitted_scales(bench: Bench, emulator, manifest: EmulatorManifest, seed: int) -> torch.Tensor:
    """A map for the dropped layers fitted on public data (the vendor's own synthetic task): prefixes
    trained from one initialisation on the emulator and on the full model (started from the same
    keys and values, mapped by stand-in); each dropped layer's keys and values are then the
    least-squares scale of its stand-in's, (L, 2), 1 for kept layers."""
    from splitprefix.data.batching import encode_examples, resolve_pad_id
    from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
    from splitprefix.data_party.train import local_loss_fn, train_prefix
    from splitprefix.model.prefix import Prefix

    public, _ = make_task(SyntheticTaskConfig(n_train=2000, n_test=0, seed=seed))
    torch.manual_seed(seed)
    emu_config = PrefixConfig.for_model(emulator.config, bench.args.prefix_len)
    emu = Prefix(emu_config)
    full_config = PrefixConfig.for_model(bench.full.config, bench.args.prefix_len)
    full = Prefix(full_config, integrate_kv(emu().detach(), manifest, "stand-in"))
    encoded, pad = encode_examples(bench.tokenizer, public, 128), resolve_pad_id(bench.tokenizer)
    for prefix, model in ((emu, emulator), (full, bench.full)):
        train_prefix(prefix, local_loss_fn(model), encoded, pad, bench.train_config(seed), None, "public")
    e, f = emu().detach(), full().detach()
    scales = torch.ones(len(manifest.layer_map), 2)
    for layer, source in enumerate(manifest.layer_map):
        if manifest.kept_layers[source] != layer:
            for kv in range(2):
                a, b = e[source, kv], f[layer, kv]
                scales[layer, kv] = (a * b).sum() / a.square().sum()
    return scales


def general_blocks(tokenizer, max_chars: int) -> torch.Tensor:
    """The vendor's general corpus (the built-in model's pretraining text) as 128-token blocks."""
    from splitprefix.pretraining import corpus as vendor

    documents = vendor.build_corpus(max_chars=max_chars, seed=1).train
    return pack_blocks(tokenizer, documents, 128)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


class Bench:
    """One process's model, data and settings, shared by every recipe and seed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.full, self.tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
        self.data: dict[str, tuple[list[Example], list[Example]]] = {}
        for name in args.corpora:
            train, test = corpus(name, args.cache)
            self.data[name] = (train, test[: args.max_test])
        self.eval = EvalConfig(exact_match=False)

    @functools.cached_property
    def blocks(self) -> torch.Tensor:
        return general_blocks(self.tokenizer, self.args.distill_chars)

    def train_config(self, seed: int) -> TrainConfig:
        a = self.args
        return TrainConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seed=seed, checkpoint_every=0)

    def loss(self, name: str, kv: torch.Tensor | None) -> float:
        return evaluate_loss(self.full, self.tokenizer, self.data[name][1], kv, self.eval)["loss"]

    def fit(self, model, name: str, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        config = PrefixConfig.for_model(model.config, self.args.prefix_len)
        prefix, _ = fit_prefix(model, self.tokenizer, self.data[name][0], config, self.train_config(seed))
        return prefix().detach()

    def emulator(self, name: str, seed: int):
        """The recipe's emulator, its manifest and build report; distilled emulators are kept in
        `--emulators` so that processes for other corpora reuse them (a `.pending` marker makes
        them wait for one being built)."""
        a, recipe = self.args, RECIPES[name]
        if recipe.kept_upper is None:
            kept = kept_layers(self.full.config, a.split_at, a.keep)
        else:
            kept = list(range(a.split_at)) + list(recipe.kept_upper)
        emulator = build(self.full, kept)
        manifest = make_manifest(a.model, self.full, self.tokenizer, a.split_at, kept)
        report: dict[str, Any] = {"kept_layers": kept}
        if recipe.distill is None:
            return emulator, manifest, report
        stored = a.emulators / f"{name}-{seed}.pt"
        pending = stored.with_suffix(".pending")
        while (pending.exists() or a.wait_emulators) and not stored.exists():
            time.sleep(10)
        if stored.exists():
            saved = torch.load(stored)
            emulator.load_state_dict(saved["state"])
            return emulator, manifest, {**report, **saved["report"]}
        a.emulators.mkdir(parents=True, exist_ok=True)
        pending.touch()
        config = DistillConfig(**{**asdict(recipe.distill), "seed": seed})
        torch.manual_seed(seed)
        if recipe.per_layer:
            done = distill_per_layer(self.full, emulator, manifest.layer_map, a.split_at, self.blocks, config)
        else:
            teacher = LoadedTeacher(self.full, a.split_at)
            done = distill(teacher, emulator, a.split_at, self.blocks, config, layer_map=manifest.layer_map)
        report["distillation"] = {k: v for k, v in done.items() if k != "config"}
        torch.save({"state": emulator.state_dict(), "report": report}, stored)
        pending.unlink()
        return emulator, manifest, report


def reference(bench: Bench, name: str, seed: int) -> dict[str, Any]:
    """The reference prefix's held-out loss: trained here, or read from the output of another run
    of this benchmark (`--reference-from`, waited for), which trains the same prefix."""
    source = bench.args.reference_from
    while source is not None:
        for line in source.read_text().splitlines() if source.exists() else []:
            record = json.loads(line) if line.startswith('{"seed"') else {}
            if record.get("seed") == seed and record.get("reference") == name:
                return {"loss": record["loss"], "from": str(source)}
        time.sleep(20)
    start = time.perf_counter()
    entry = {"loss": bench.loss(name, bench.fit(bench.full, name, seed))}
    entry["train_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps({"seed": seed, "reference": name, **entry}), flush=True)
    return entry


def run_seed(bench: Bench, seed: int, recipes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"reference": {}, "recipes": {}}
    if bench.args.reference_from is None:
        out["reference"] = {name: reference(bench, name, seed) for name in bench.args.corpora}
    for recipe_name in recipes:
        start = time.perf_counter()
        emulator, manifest, entry = bench.emulator(recipe_name, seed)
        entry["build_s"] = round(time.perf_counter() - start, 1)
        scales = fitted_scales(bench, emulator, manifest, seed) if bench.args.fitted_map else None
        if scales is not None:
            entry["fitted_scales"] = scales.tolist()
        for name in bench.args.corpora:
            kv = bench.fit(emulator, name, seed)
            entry[name] = {
                "stand-in": bench.loss(name, integrate_kv(kv, manifest, "stand-in")),
                "zeros": bench.loss(name, integrate_kv(kv, manifest, "zeros")),
                "interpolate": bench.loss(name, interpolate_kv(kv, manifest)),
            }
            if scales is not None:
                mapped = integrate_kv(kv, manifest, "stand-in") * scales[:, :, None, None, None]
                entry[name]["fitted"] = bench.loss(name, mapped)
        out["recipes"][recipe_name] = entry
        print(json.dumps({"seed": seed, "recipe": recipe_name, **entry}), flush=True)
    if bench.args.reference_from is not None:  # read once the other run has trained them
        out["reference"] = {name: reference(bench, name, seed) for name in bench.args.corpora}
    return out


def share(base: float, plug: float, ref: float) -> float:
    return (base - plug) / (base - ref)


def aggregate(bench: Bench, base: dict[str, float], seeds: dict[int, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    runs = list(seeds.values())
    for name in bench.args.corpora:
        refs = [r["reference"][name]["loss"] for r in runs]
        table: dict[str, Any] = {"no_prefix": round(base[name], 4), "reference": summary(refs)}
        for recipe in runs[0]["recipes"]:
            for mapping in [m for m in MAPPINGS if m in runs[0]["recipes"][recipe][name]]:
                losses = [r["recipes"][recipe][name][mapping] for r in runs]
                shares = [share(base[name], p, ref) for p, ref in zip(losses, refs, strict=True)]
                table[f"{recipe}/{mapping}"] = {"loss": summary(losses), "share": summary(shares)}
        result[name] = table
    return result


def merge(paths: list[Path]) -> dict[str, Any]:
    """One result from the outputs of several runs (split by corpus or recipe to use more cores):
    their one-line records of no-prefix, reference and recipe losses."""
    base: dict[str, float] = {}
    runs: dict[int, dict[str, Any]] = {}
    recipes: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.startswith('{"'):  # the one-line records, not a final summary
                continue
            record = json.loads(line)
            if "no_prefix" in record:
                base.update(record["no_prefix"])
                continue
            run = runs.setdefault(record.pop("seed"), {"reference": {}, "recipes": {}})
            if "reference" in record:
                run["reference"][record.pop("reference")] = record
            else:
                name = record.pop("recipe")
                stored = recipes.setdefault(name, {})
                for corpus_name in CORPORA:
                    if corpus_name in record:
                        run["recipes"].setdefault(name, {})[corpus_name] = record.pop(corpus_name)
                stored.update(record)
    table: dict[str, Any] = {}
    for name in sorted(base):
        refs = {seed: r["reference"][name]["loss"] for seed, r in runs.items() if name in r["reference"]}
        if not refs:
            continue
        table[name] = {"no_prefix": round(base[name], 4), "reference": summary(list(refs.values()))}
        for recipe in sorted(recipes):
            for mapping in MAPPINGS:
                pairs = [
                    (r["recipes"][recipe][name][mapping], refs[seed])
                    for seed, r in runs.items()
                    if mapping in r["recipes"].get(recipe, {}).get(name, {}) and seed in refs
                ]
                if pairs:
                    table[name][f"{recipe}/{mapping}"] = {
                        "seeds": len(pairs),
                        "loss": summary([p for p, _ in pairs]),
                        "share": summary([share(base[name], p, ref) for p, ref in pairs]),
                    }
    return {"summary": table, "recipes": recipes, "seeds": runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--corpora", nargs="+", choices=CORPORA, default=list(CORPORA))
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["layer_drop", "hidden"])
    parser.add_argument("--cache", type=Path, default=Path(".cache/real_text"))
    parser.add_argument("--max-test", type=int, default=300, help="Held-out examples scored per corpus.")
    parser.add_argument("--distill-chars", type=int, default=3_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--emulators", type=Path, default=Path(".cache/offsite_emulators"))
    parser.add_argument(
        "--reference-from", type=Path, default=None, help="Output of a run that trains the references."
    )
    parser.add_argument("--wait-emulators", action="store_true", help="Wait for another run's emulators.")
    parser.add_argument("--distill-only", action="store_true", help="Build the recipes' emulators and stop.")
    parser.add_argument("--merge", type=Path, nargs="+", help="Merge the outputs of earlier runs and stop.")
    parser.add_argument(
        "--fitted-map", action="store_true", help="Also map dropped layers by scales fitted on public data."
    )
    args = parser.parse_args()
    if args.merge:
        print(json.dumps({"benchmark": "offsite_transfer", **merge(args.merge)}, indent=2))
        return
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    if args.distill_only:
        for seed in args.seeds:
            for name in args.recipes:
                print(json.dumps({"seed": seed, "recipe": name, **bench.emulator(name, seed)[2]}), flush=True)
        return
    base = {name: bench.loss(name, None) for name in args.corpora}
    print(json.dumps({"no_prefix": base}), flush=True)
    seeds = {seed: run_seed(bench, seed, args.recipes) for seed in args.seeds}
    sizes = {n: {"train": len(d[0]), "held_out": len(d[1])} for n, d in bench.data.items()}
    result = {
        "benchmark": "offsite_transfer",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpora": sizes,
        "recipes": {
            n: {
                "distill": asdict(RECIPES[n].distill) if RECIPES[n].distill else None,
                "kept_upper": RECIPES[n].kept_upper,
            }
            for n in args.recipes
        },
        "summary": aggregate(bench, base, seeds),
        "seeds": seeds,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

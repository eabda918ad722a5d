"""The demo's measurements: held-out scores, split generation beside the answers, and tokens/s."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from splitprefix.data.formats import Example
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.evaluation.metrics import normalize_answer


def score(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test: list[Example], kv: torch.Tensor | None
) -> dict[str, float]:
    """Held-out loss and exact match of the whole model with prefix `kv` (None = no prefix)."""
    report = evaluate(model, tokenizer, test, kv, EvalConfig(max_length=128, exact_match=True))
    return {"loss": round(report["loss"], 4), "exact_match": round(report["exact_match"], 4)}


GENERATION_CHUNK = 25
"""Held-out prompts per split generation call: one server session of this many rows at a time."""


def generate_samples(split: SplitModel, examples: list[Example]) -> dict[str, Any]:
    """Greedy split generation of every example's answer: the rows, the accuracy per intent, and the
    bytes it took."""
    before = split.client.traffic.snapshot()
    config = GenerationConfig(max_new_tokens=8, stop=("\n",))
    done = []
    for start in range(0, len(examples), GENERATION_CHUNK):
        done += split.generate([e.prompt for e in examples[start : start + GENERATION_CHUNK]], config)
    after = split.client.traffic.snapshot()
    rows: list[dict[str, Any]] = []
    for example, completion in zip(examples, done, strict=True):
        expected, generated = normalize_answer(example.completion), normalize_answer(completion.text)
        rows.append(
            {
                "prompt": example.prompt.strip().splitlines()[0],
                "intent": str(example.label),
                "expected": expected,
                "generated": generated,
                "match": expected == generated,
            }
        )
    return {
        "rows": rows,
        "exact_match": round(sum(r["match"] for r in rows) / max(len(rows), 1), 4),
        "per_intent": per_intent(rows),
        "new_tokens": sum(len(c.token_ids) for c in done),
        "bytes_sent": after["bytes_sent"] - before["bytes_sent"],
        "bytes_received": after["bytes_received"] - before["bytes_received"],
    }


def per_intent(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per intent (alphabetical): held-out examples, answers right, and the most frequent wrong answer."""
    out = []
    for intent in sorted({r["intent"] for r in rows}):
        mine = [r for r in rows if r["intent"] == intent]
        wrong = Counter(r["generated"] for r in mine if not r["match"])
        top = wrong.most_common(1)
        out.append(
            {
                "intent": intent,
                "answer": mine[0]["expected"],
                "examples": len(mine),
                "right": sum(r["match"] for r in mine),
                "top_wrong": top[0][0] if top else None,
                "top_wrong_count": top[0][1] if top else 0,
            }
        )
    return out


@torch.no_grad()
def whole_generate_seconds(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, new: int, pad: int
) -> float:
    """Seconds for the whole model's HF `generate` (greedy, KV cache) of exactly `new` tokens per row."""
    start = time.perf_counter()
    cast(Any, model).generate(  # mypy reads `generate` through transformers' lazy stubs as a Tensor
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
    )
    return time.perf_counter() - start


def _split_seconds(split: SplitModel, ids: torch.Tensor, mask: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    count = sum(
        1 for _ in split.iter_tokens(ids, mask, GenerationConfig(max_new_tokens=new, stop_at_eos=False))
    )
    assert count == new, (count, new)
    return time.perf_counter() - start


def tokens_per_second(
    split: SplitModel, whole: PreTrainedModel, prompts: list[str], new: int, reps: int
) -> list[dict[str, Any]]:
    """Greedy tokens/s of split generation and of the whole model's HF `generate` (no prefix, EOS ignored).

    Batch 1 and a batch of every prompt; the two sides alternate, and each takes its median of `reps`.
    """
    rows = []
    for batch in sorted({1, len(prompts)}):
        ids, mask = split.encode(prompts[:batch])
        whole_generate_seconds(whole, ids, mask, 2, split.pad_id)  # warm-up
        _split_seconds(split, ids, mask, 2)
        whole_s, split_s = [], []
        for _ in range(reps):
            whole_s.append(whole_generate_seconds(whole, ids, mask, new, split.pad_id))
            split_s.append(_split_seconds(split, ids, mask, new))
        tokens = batch * new
        whole_tps, split_tps = tokens / statistics.median(whole_s), tokens / statistics.median(split_s)
        rows.append(
            {
                "batch": batch,
                "new_tokens_per_row": new,
                "whole_tokens_per_s": round(whole_tps, 1),
                "split_tokens_per_s": round(split_tps, 1),
                "ratio": round(split_tps / whole_tps, 3),
            }
        )
    return rows

"""Split-generation benchmark: tokens/s of split generation against the whole model's HF `generate`.

The server (`splitprefix serve`) and this client run as separate processes on loopback, as the two
parties would. Each generation opens its session over HTTP and sends its steps over the session's
WebSocket (`--http-steps`: one HTTP request per step, as before the socket). Greedy decoding of the
same prompts, the same number of new tokens (EOS ignored on both sides), at batch 1 and batch 8;
the whole model's `generate` uses its KV cache. Whole-model runs are interleaved with the split runs
against drift. Prints JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_generation.py --model builtin --split-at 2

- `ratio` = split tokens/s ÷ whole tokens/s, medians (goals: >= 0.8 at batch 1, >= 0.9 at batch 8);
  `ratio_best` compares the fastest run of each, the least disturbed by other load.
- `ttft_s`: time to first token (tokenized prompts in, first token chosen), median.
- `bytes_per_token`: request and answer bodies (socket messages) per generated token, prefill and
  session close included, HTTP headers and WebSocket framing not; `tensor_bytes_per_token` is the
  tensors' own share (the rest is safetensors headers and control metadata).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_server, print_run

from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.demo.measure import whole_generate_seconds
from splitprefix.model.loading import describe_model, load_causal_lm
from splitprefix.model_party.compress import emulate

PROMPTS = [
    "happiness: the state of",
    "a tool used for cutting wood",
    "The module provides functions for",
    "river: a large natural stream of",
    "an act of giving",
    "computer: a machine that",
    "Return the number of items in",
    "the branch of science that studies",
]


def _wire(model: SplitModel) -> tuple[int, int]:
    """(body bytes, tensor payload bytes) sent and received so far."""
    t = model.client.traffic
    return t.bytes_sent + t.bytes_received, t.payload_sent + t.payload_received


def split_run(
    model: SplitModel, ids: torch.Tensor, mask: torch.Tensor, new: int
) -> tuple[float, float, tuple[int, int]]:
    """(seconds, seconds to the first token, (body, payload) bytes) of split generation of `new` tokens."""
    config = GenerationConfig(max_new_tokens=new, stop_at_eos=False)
    before = _wire(model)
    start = time.perf_counter()
    first = 0.0
    count = 0
    for count, _ in enumerate(model.iter_tokens(ids, mask, config), start=1):
        if count == 1:
            first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    assert count == new, (count, new)
    after = _wire(model)
    return elapsed, first, (after[0] - before[0], after[1] - before[1])


def measure(args: argparse.Namespace, whole: Any, split: SplitModel, batch: int) -> dict[str, Any]:
    ids, mask = split.encode(PROMPTS[:batch])
    new, pad = args.new_tokens, split.pad_id
    whole_generate_seconds(whole, ids, mask, 2, pad)  # warm-up
    split_run(split, ids, mask, 2)
    whole_s, whole_first, split_s, first_s, wire = [], [], [], [], []
    for _ in range(args.reps):
        whole_s.append(whole_generate_seconds(whole, ids, mask, new, pad))
        whole_first.append(whole_generate_seconds(whole, ids, mask, 1, pad))
        elapsed, first, nbytes = split_run(split, ids, mask, new)
        split_s.append(elapsed)
        first_s.append(first)
        wire.append(nbytes)
    tokens = batch * new
    whole_tps = tokens / statistics.median(whole_s)
    split_tps = tokens / statistics.median(split_s)
    return {
        "batch": batch,
        "prompt_tokens": int(mask.sum()),
        "new_tokens_per_row": new,
        "whole_tokens_per_s": round(whole_tps, 1),
        "split_tokens_per_s": round(split_tps, 1),
        "ratio": round(split_tps / whole_tps, 3),
        # the fastest run of each is the least disturbed by other load on shared cores
        "ratio_best": round(min(whole_s) / min(split_s), 3),
        "whole_ttft_s": round(statistics.median(whole_first), 4),
        "split_ttft_s": round(statistics.median(first_s), 4),
        "bytes_per_token": round(statistics.median(w[0] for w in wire) / tokens, 1),
        "tensor_bytes_per_token": round(statistics.median(w[1] for w in wire) / tokens, 1),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    emulator = work / "emulator"
    emulate(args.model, args.split_at, 1, emulator)
    whole = load_causal_lm(args.model)
    rows: list[dict[str, Any]] = []
    with benchmark_server(args.model, args.split_at, work) as (url, token, _):
        for head in ("server", "client"):
            with SplitModel.open(
                emulator,
                ClientSettings(
                    url,
                    token=token,
                    head=head,
                    wire_dtype=args.wire_dtype,  # type: ignore[arg-type]
                    stream_steps=not args.http_steps,
                ),
            ) as split:
                for batch in (1, 8):
                    rows.append({"head": head, **measure(args, whole, split, batch)})
    return {
        "model": args.model,
        "model_info": describe_model(args.model),
        "split_at": args.split_at,
        "wire_dtype": args.wire_dtype,
        "reps": args.reps,
        "device": "cpu (no GPU in this run)",
        "torch_threads": torch.get_num_threads(),
        "goal": "ratio >= 0.8 at batch 1 and >= 0.9 at batch 8",
        "head_server_uses_top_1": True,
        "steps_over": "http" if args.http_steps else "websocket",
        "runs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin", help="Full model directory, or 'builtin'.")
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--wire-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--reps", type=int, default=3, help="Timed generations per configuration.")
    parser.add_argument("--http-steps", action="store_true", help="Steps over HTTP, not the WebSocket.")
    print_run(run, parser.parse_args())


if __name__ == "__main__":
    main()

"""Split-training benchmark: step time of the split against the whole model, and traffic per token.

The server (`splitprefix serve`) and this client run as separate processes on loopback, as the two
parties would. One batch of the synthetic task is trained on the whole model in this process and
through the split, for each head mode, backward path and wire dtype. Prints JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_training.py --model builtin --split-at 2

Bytes are message bodies (safetensors blobs), per real token of the batch and per supervised token;
the floor is the tensors' own size (`wire.tensors.payload_bytes`), so `overhead` is the encoding's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_server, print_run

from splitprefix.data.batching import Batch, collate, encode_examples, resolve_pad_id
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import local_loss_fn
from splitprefix.model.loading import describe_model, load_causal_lm, load_tokenizer
from splitprefix.model.prefix import PrefixConfig
from splitprefix.model_party.compress import emulate

LossFn = Callable[[Batch, torch.Tensor], tuple[torch.Tensor, int]]


def step_times(loss_fn: LossFn, batch: Batch, kv: torch.Tensor, reps: int) -> list[float]:
    """Seconds of each training step (forward, loss, backward) after one warm-up step."""
    times = []
    for rep in range(reps + 1):
        kv.grad = None
        start = time.perf_counter()
        loss, n = loss_fn(batch, kv)
        (loss / n).backward()
        if rep:
            times.append(time.perf_counter() - start)
    return times


def traffic_per_token(
    before: dict[str, int], after: dict[str, int], steps: int, batch: Batch
) -> dict[str, Any]:
    tokens, positions = int(batch.attention_mask.sum()), batch.attention_mask.numel()
    supervised = int((batch.labels[:, 1:] != -100).sum())
    out: dict[str, Any] = {}
    for direction in ("sent", "received"):
        wire = (after[f"bytes_{direction}"] - before[f"bytes_{direction}"]) / steps
        floor = (after[f"payload_{direction}"] - before[f"payload_{direction}"]) / steps
        out[direction] = {
            "bytes_per_token": round(wire / tokens, 1),
            "bytes_per_position": round(wire / positions, 1),  # padding positions travel too
            "bytes_per_supervised_token": round(wire / supervised, 1),
            "minimum_per_token": round(floor / tokens, 1),
            "overhead": round(wire / floor, 4),
        }
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    examples, _ = make_task(SyntheticTaskConfig(n_train=args.batch_size, n_test=0))
    batch = collate(encode_examples(tokenizer, examples, args.max_length), resolve_pad_id(tokenizer))
    emulator = work / "emulator"
    emulate(args.model, args.split_at, 1, emulator)
    full = load_causal_lm(args.model)
    kv = torch.zeros(PrefixConfig.for_model(full.config, args.prefix_len).kv_shape).normal_(0, 0.02)
    kv.requires_grad_(True)
    whole: list[float] = step_times(local_loss_fn(full), batch, kv, args.reps)
    results = []
    with benchmark_server(args.model, args.split_at, work) as (url, token, _):
        for head in ("client", "server"):
            for keep_graph in (True, False):
                for wire in ("fp32", "bf16", "fp16"):
                    settings = ClientSettings(
                        url, token=token, head=head, wire_dtype=wire, keep_graph=keep_graph
                    )  # type: ignore[arg-type]
                    session = open_split(emulator, settings)
                    before = session.client.traffic.snapshot()
                    split = step_times(session.loss_fn(), batch, kv, args.reps)
                    traffic = traffic_per_token(
                        before, session.client.traffic.snapshot(), args.reps + 1, batch
                    )
                    session.close()
                    whole += step_times(local_loss_fn(full), batch, kv, 1)  # interleaved against drift
                    results.append(
                        {
                            "head": head,
                            "backward": "graph-held" if keep_graph else "recompute",
                            "wire_dtype": wire,
                            "split_step_s": round(statistics.median(split), 4),
                            "traffic": traffic,
                        }
                    )
    whole_s = statistics.median(whole)
    for row in results:
        row["ratio_to_whole"] = round(row["split_step_s"] / whole_s, 3)
    summary = {
        f"{row['head']}_head_{row['backward']}": row["ratio_to_whole"]
        for row in results
        if row["wire_dtype"] == "fp32"
    }
    return {
        "model": args.model,
        "model_info": describe_model(args.model),
        "split_at": args.split_at,
        "batch": {
            "size": args.batch_size,
            "padded_length": batch.input_ids.shape[1],
            "real_tokens": int(batch.attention_mask.sum()),
            "supervised_tokens": int((batch.labels[:, 1:] != -100).sum()),
            "prefix_len": args.prefix_len,
        },
        "reps": args.reps,
        "torch_threads": torch.get_num_threads(),
        "whole_step_s": round(whole_s, 4),
        "goal": "ratio_to_whole <= 1.15 with the graph held",
        "ratio_to_whole_fp32": summary,
        "runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin", help="Full model directory, or 'builtin'.")
    parser.add_argument("--split-at", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument(
        "--reps", type=int, default=5, help="Timed steps per configuration (after a warm-up)."
    )
    print_run(run, parser.parse_args())


if __name__ == "__main__":
    main()

"""What the U-shaped split costs the data party: traffic per token, step time and memory, per M.

The server (`splitprefix serve --max-client-layers M`) and this client run as separate processes
on loopback. One batch of the synthetic task is trained through the split (head=client, graph
held, fp32 wire) keeping M = 0, 1, 2 of the top layers at the data party. Prints JSON.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/u_split_cost.py --model builtin --split-at 1

Memory is the data party's: the bytes of the parameters it loads (embeddings, layers [0, K), the
top M layers, norm and head), and the bytes autograd saves for one step's backward on its side.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from harness import benchmark_server, print_run
from split_training import step_times, traffic_per_token

from splitprefix.data.batching import collate, encode_examples, resolve_pad_id
from splitprefix.data.synthetic import SyntheticTaskConfig, make_task
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import SplitSession, open_split
from splitprefix.model.loading import load_tokenizer
from splitprefix.model_party.compress import emulate


def party_bytes(session: SplitSession) -> int:
    """Bytes of the parameters the data party holds (shared tensors counted once)."""
    parts = [session.bottom, session.head, session.client_top]
    tensors = {id(p): p for part in parts if part is not None for p in part.parameters()}
    return sum(p.numel() * p.element_size() for p in tensors.values())


def saved_bytes(session: SplitSession, batch: Any, kv: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of one step on the data party's side."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = session.loss_fn()(batch, kv)
    loss.backward()
    return total


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    examples, _ = make_task(SyntheticTaskConfig(n_train=args.batch_size, n_test=0))
    batch = collate(encode_examples(tokenizer, examples, args.max_length), resolve_pad_id(tokenizer))
    top = max(args.client_layers)
    emulator = work / "emulator"
    emulate(args.model, args.split_at, top + 1, emulator, client_layers=top)
    results = []
    extra = ("--max-client-layers", str(top))
    with benchmark_server(args.model, args.split_at, work, extra) as (url, token, _):
        for m in args.client_layers:
            session = open_split(emulator, ClientSettings(url, token=token, head="client", client_layers=m))
            kv = (
                torch.zeros(session.prefix_config(args.prefix_len).kv_shape).normal_(0, 0.02).requires_grad_()
            )
            before = session.client.traffic.snapshot()
            times = step_times(session.loss_fn(), batch, kv, args.reps)
            traffic = traffic_per_token(before, session.client.traffic.snapshot(), args.reps + 1, batch)
            results.append(
                {
                    "client_layers": m,
                    "split_step_s": round(statistics.median(times), 4),
                    "traffic": traffic,
                    "party_parameter_bytes": party_bytes(session),
                    "party_saved_bytes_per_step": saved_bytes(session, batch, kv),
                }
            )
            session.close()
    return {
        "model": args.model,
        "split_at": args.split_at,
        "batch": {"size": args.batch_size, "real_tokens": int(batch.attention_mask.sum())},
        "prefix_len": args.prefix_len,
        "reps": args.reps,
        "runs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin", help="Full model directory, or 'builtin'.")
    parser.add_argument("--split-at", type=int, default=1)
    parser.add_argument("--client-layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="Timed steps per M (after a warm-up).")
    print_run(run, parser.parse_args())


if __name__ == "__main__":
    main()

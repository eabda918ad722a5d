"""The model party's compute: the top of the model, run for data parties' training steps.

`TopBackend` knows nothing about HTTP. It takes decoded wire tensors and metadata, checks them,
runs layers [K, L) (and the head for head=server) exactly as the whole model does, and returns the
tensors to send back. Requests are served one at a time: torch already uses every core, and a
lock keeps the graph store consistent.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import astuple
from typing import Any

import torch

from splitprefix.model.prefix import prefix_cache
from splitprefix.model.registry import architecture_of, model_dims
from splitprefix.model.split import Activations
from splitprefix.model_party.graphs import GraphStore, HeldGraph, SavedBytes
from splitprefix.model_party.settings import ServerSettings
from splitprefix.model_party.top_loader import LoadedTop, load_top
from splitprefix.model_party.validation import (
    ForwardInputs,
    RequestError,
    StepMeta,
    TopShape,
    check_forward_inputs,
    check_grad_output,
    check_meta,
    check_names,
    forward_names,
    has_forward_inputs,
)
from splitprefix.wire import schemas
from splitprefix.wire.tensors import WIRE_DTYPES

logger = logging.getLogger(__name__)
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Tensors = dict[str, torch.Tensor]


class TopBackend:
    """Layers [K, L), norm and head of one model, serving forward and backward of training steps."""

    def __init__(self, settings: ServerSettings, loaded: LoadedTop | None = None) -> None:
        self.settings = settings
        self.dtype = COMPUTE_DTYPES[settings.dtype]
        self.top = loaded or load_top(settings.model_dir, settings.split_at, self.dtype, settings.device)
        self.config = self.top.model.config
        self.dims = model_dims(self.config)
        self.shape = TopShape(
            dims=self.dims,
            split_at=settings.split_at,
            bottom_sha256=self.top.bottom_sha256,
            head_modes=settings.head_modes,
            max_batch_size=settings.max_batch_size,
            max_tokens=settings.max_tokens,
        )
        self.graphs = GraphStore(
            settings.graph_ttl_s, settings.max_graph_bytes, settings.max_graphs_per_client
        )
        self._weights = [*self.top.stack.parameters(), *self.top.head.parameters()]
        self._lock = threading.Lock()

    def info(self) -> schemas.ModelInfo:
        """What a data party checks before training: sizes, prefix layout, fingerprints, limits."""
        s, d = self.settings, self.dims
        layers = list(range(s.split_at, d.num_layers))
        return schemas.ModelInfo(
            protocol_version=schemas.PROTOCOL_VERSION,
            architecture=architecture_of(self.config).name,
            num_layers=d.num_layers,
            split_at=s.split_at,
            hidden_size=d.hidden_size,
            vocab_size=d.vocab_size,
            head_modes=s.head_modes,
            prefix=schemas.PrefixLayout(
                layers=layers,
                num_kv_heads=d.num_kv_heads,
                head_dim=d.head_dim,
                shape=f"({len(layers)}, 2, {d.num_kv_heads}, P, {d.head_dim})",
                layers_kv=None if d.uniform else [list(astuple(layer)) for layer in d.layer_kv],
            ),
            fingerprints=schemas.Fingerprints(
                base_config_sha256=self.top.base_config_sha256,
                tokenizer_sha256=self.top.tokenizer_sha256,
                bottom_sha256=self.top.bottom_sha256,
            ),
            limits=schemas.Limits(
                max_request_bytes=s.max_request_bytes,
                max_batch_size=s.max_batch_size,
                max_tokens=s.max_tokens,
                max_sessions=s.max_sessions,
                max_sessions_per_client=s.max_sessions_per_client,
                max_session_bytes=s.max_session_bytes,
                session_ttl_s=s.session_ttl_s,
            ),
            wire_dtypes=list(WIRE_DTYPES),
            warnings=[schemas.HEAD_SERVER_WARNING] if "server" in s.head_modes else [],
        )

    def forward(
        self, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Tensors, dict[str, Any]]:
        """`output`: (B, T, d) last hidden states (head=client) or (N, V) supervised logits (head=server).

        With meta `keep_graph` (default true) the graph is held for the backward of this step.
        """
        step = check_meta(meta, self.shape, forward=True)
        check_names(tensors, forward_names(step.head), f"head={step.head} forward request")
        inputs = check_forward_inputs(tensors, self.shape, step.head)
        with self._lock:
            held = False
            if step.keep_graph:
                graph = self._forward_with_graph(inputs, step.head)
                held = self.graphs.put(client_id, step.step_id, graph)
                output = graph.output.detach()
            else:
                with torch.no_grad():
                    output, _ = self._run(inputs, step.head, requires_grad=False)
        return {schemas.OUTPUT: output.float().cpu()}, step.reply(graph_held=held)

    def backward(
        self, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Tensors, dict[str, Any]]:
        """`grad_hidden` (B, T, d) and `grad_prefix_kv` (L - K, 2, n_kv, P, hd) for `grad_output`.

        Uses the held graph of (client, step) if there is one, else recomputes the forward from the
        inputs in the request, else answers 409 `graph_missing`.
        """
        step = check_meta(meta, self.shape, forward=False)
        recompute = has_forward_inputs(tensors)
        expected = [*forward_names(step.head), schemas.GRAD_OUTPUT] if recompute else [schemas.GRAD_OUTPUT]
        check_names(tensors, expected, f"head={step.head} backward request")
        inputs = check_forward_inputs(tensors, self.shape, step.head) if recompute else None
        with self._lock:
            graph = self.graphs.get(client_id, step.step_id)
            if graph is not None and graph.head != step.head:
                raise RequestError(
                    422,
                    "invalid_meta",
                    f"step {step.step_id!r} was forwarded with head={graph.head}; its backward asked for "
                    f"head={step.head}",
                )
            if graph is None and inputs is None:
                raise _graph_missing(step)
            if graph is None:
                assert inputs is not None
                graph = self._forward_with_graph(inputs, step.head)
            grad_output = check_grad_output(tensors, tuple(graph.output.shape))
            self.graphs.discard(client_id, step.step_id)
            grads = self._grads(graph, grad_output)
        return grads, step.reply(graph_held=False)

    def _forward_with_graph(self, inputs: ForwardInputs, head: schemas.HeadMode) -> HeldGraph:
        saved = SavedBytes(self._weights)
        with torch.enable_grad(), saved.measure():
            output, leaves = self._run(inputs, head, requires_grad=True)
        for leaf in (*leaves, output):
            saved.add(leaf)
        return HeldGraph(output=output, inputs=leaves, head=head, nbytes=saved.nbytes)

    def _run(
        self, inputs: ForwardInputs, head: schemas.HeadMode, requires_grad: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The top's output and its input leaves, computed like the whole model's forward."""
        device = self.settings.device
        hidden = inputs.hidden.to(device, self.dtype).requires_grad_(requires_grad)  # (B, T, d)
        kv = inputs.prefix_kv.to(device, self.dtype).requires_grad_(requires_grad)  # (L - K, 2, n_kv, P, hd)
        batch = hidden.shape[0]
        # an empty prefix is no prefix: the cache would hold zero-length layers
        cache = prefix_cache(kv, self.config, batch, self.settings.split_at) if inputs.prefix_len else None
        x = Activations(hidden, inputs.attention_mask.to(device), inputs.positions.to(device))
        last = self.top.stack(x, cache)  # (B, T, d)
        if head == "client":
            return last, (hidden, kv)
        assert inputs.supervised is not None
        # the norm and head act per token, so running them on the supervised rows only is exact
        logits = self.top.head(last[inputs.supervised.to(device).bool()])  # (N, V)
        return logits, (hidden, kv)

    def _grads(self, graph: HeldGraph, grad_output: torch.Tensor) -> Tensors:
        grad = grad_output.to(graph.output.device, graph.output.dtype)
        hidden, kv = graph.inputs
        # the prefix is unused when P = 0, and a head=server step with N = 0 uses nothing
        g_hidden, g_kv = torch.autograd.grad(graph.output, (hidden, kv), grad, allow_unused=True)
        return {
            schemas.GRAD_HIDDEN: _or_zeros(g_hidden, hidden),
            schemas.GRAD_PREFIX: _or_zeros(g_kv, kv),
        }


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like) if grad is None else grad
    return out.detach().float().cpu()


def _graph_missing(step: StepMeta) -> RequestError:
    return RequestError(
        409,
        schemas.GRAPH_MISSING,
        f"the server holds no forward graph for step {step.step_id!r} (expired, evicted, never kept, or "
        "the server restarted); resend this backward with the forward inputs "
        f"{', '.join(forward_names(step.head))} to have it recomputed",
    )

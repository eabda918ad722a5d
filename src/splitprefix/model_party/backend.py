"""The model party's compute: the top of the model, run for data parties' training steps.

`TopBackend` knows nothing about HTTP. It takes decoded wire tensors and metadata, checks them,
runs layers [K, L) (and the head and the loss for head=server) exactly as the whole model does, and returns the
tensors to send back. Every request's compute is a job of the `model_party.scheduler`, whose one
worker thread owns the model (torch already uses every core) and so keeps the graph store
consistent; training jobs give way to generation steps before each layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import astuple
from typing import Any

import torch
import torch.nn.functional as F

from splitprefix.errors import ConfigError
from splitprefix.model.emulator import top_fingerprint
from splitprefix.model.loading import checkpoint_dtype
from splitprefix.model.prefix import prefix_cache
from splitprefix.model.registry import architecture_of, model_dims
from splitprefix.model.split import Activations, LayerStack
from splitprefix.model_party.cancel import check
from splitprefix.model_party.graphs import GraphStore, HeldGraph, SavedBytes
from splitprefix.model_party.scheduler import Job, Scheduler
from splitprefix.model_party.settings import ServerSettings
from splitprefix.model_party.top_loader import LoadedTop, load_top
from splitprefix.model_party.validation import (
    ForwardInputs,
    RequestError,
    StepMeta,
    TopShape,
    check_forward_inputs,
    check_grad_output,
    check_head,
    check_meta,
    check_names,
    check_targets,
    forward_names,
    has_forward_inputs,
)
from splitprefix.runtime import DTYPES
from splitprefix.wire import schemas
from splitprefix.wire.disclosure import disclosures
from splitprefix.wire.tensors import WIRE_DTYPES

logger = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]


class TopBackend:
    """Layers [K, L), norm and head of one model, serving forward and backward of training steps."""

    def __init__(self, settings: ServerSettings, loaded: LoadedTop | None = None) -> None:
        self.settings = settings
        auto = settings.dtype == "auto"
        self.dtype = checkpoint_dtype(settings.model_dir) if auto else DTYPES[settings.dtype]
        self.top = loaded or load_top(settings.model_dir, settings.split_at, self.dtype, settings.device)
        self.config = self.top.model.config
        self.dims = model_dims(self.config)
        self.stacks = self._stacks(settings.max_client_layers)
        self.shape = TopShape(
            dims=self.dims,
            split_at=settings.split_at,
            bottom_sha256=self.top.bottom_sha256,
            head_modes=settings.head_modes,
            max_batch_size=settings.max_batch_size,
            max_tokens=settings.max_tokens,
            max_client_layers=settings.max_client_layers,
            top_sha256={str(m): top_fingerprint(self.top.model, m) for m in self.stacks if m},
        )
        self.graphs = GraphStore(
            settings.graph_ttl_s, settings.max_graph_bytes, settings.max_graphs_per_client
        )
        self._weights = [*self.top.stack.parameters(), *self.top.head.parameters()]
        self.scheduler = Scheduler(settings.max_merged_rows, settings.max_merged_keys)
        self._lock = self.scheduler.busy  # held while the worker computes (tests hold it to wait)
        for layer in self.top.stack.layers:  # a request whose client is gone stops between layers
            layer.register_forward_pre_hook(self._before_layer)

    def _stacks(self, max_client_layers: int) -> dict[int, LayerStack]:
        """Layers [K, L - M) for each allowed M (views of the loaded layers; M = 0 is the whole top)."""
        k, num_layers = self.settings.split_at, self.dims.num_layers
        if not max_client_layers < num_layers - k:
            raise ConfigError(
                f"max_client_layers must leave this server a layer: M < L - K = {num_layers - k}; "
                f"got {max_client_layers}"
            )
        stacks = {0: self.top.stack}
        for m in range(1, max_client_layers + 1):
            stacks[m] = LayerStack(self.top.model, k, num_layers - m)
        return stacks

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
                top_sha256=self.shape.top_sha256,
            ),
            limits=schemas.Limits(
                max_request_bytes=s.max_request_bytes,
                max_batch_size=s.max_batch_size,
                max_tokens=s.max_tokens,
                max_sessions=s.max_sessions,
                max_sessions_per_client=s.max_sessions_per_client,
                max_session_bytes=s.max_session_bytes,
                session_ttl_s=s.session_ttl_s,
                max_requests_per_client=s.max_requests_per_client,
                max_streams_per_client=s.max_streams_per_client,
                max_streams_per_session=s.max_streams_per_session,
            ),
            wire_dtypes=list(WIRE_DTYPES),
            warnings=list(disclosures(s.head_modes).values()),
            head_disclosure=disclosures(s.head_modes),
            max_client_layers=s.max_client_layers,
        )

    def forward(
        self, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Tensors, dict[str, Any]]:
        """head=client: `output`, the (B, T, d) last hidden states before the final norm (after layer
        L - M with meta `client_layers` M, the U-shaped split).

        With meta `keep_graph` (default true) the graph is held for the backward of this step.
        """
        step = check_meta(meta, self.shape, forward=True)
        check_head(step, "client", schemas.FORWARD_PATH)
        check_names(tensors, forward_names(step.head), "forward request")
        inputs = check_forward_inputs(tensors, self.shape, step.client_layers)

        def run() -> tuple[Tensors, bool]:
            if not step.keep_graph:
                with torch.no_grad():
                    output, _ = self._run(inputs, requires_grad=False, client_layers=step.client_layers)
                return {schemas.OUTPUT: output.float().cpu()}, False
            graph = self._forward_with_graph(inputs, step.client_layers)
            held = self.graphs.put(client_id, step.step_id, graph)
            return {schemas.OUTPUT: graph.output.detach().float().cpu()}, held

        (out, held), queued = self._submit(client_id, inputs, run)
        return out, step.reply(graph_held=held, queue_ms=queued)

    def backward(
        self, tensors: Tensors, meta: dict[str, Any], client_id: str
    ) -> tuple[Tensors, dict[str, Any]]:
        """`grad_hidden` (B, T, d) and `grad_prefix_kv` (L - K, 2, n_kv, P, hd) for `grad_output`.

        Uses the held graph of (client, step) if there is one, else recomputes the forward from the
        inputs in the request, else answers 409 `graph_missing`.
        """
        step = check_meta(meta, self.shape, forward=False)
        check_head(step, "client", schemas.BACKWARD_PATH)
        recompute = has_forward_inputs(tensors)
        expected = [*forward_names(step.head), schemas.GRAD_OUTPUT] if recompute else [schemas.GRAD_OUTPUT]
        check_names(tensors, expected, "backward request")
        inputs = check_forward_inputs(tensors, self.shape, step.client_layers) if recompute else None

        def run() -> Tensors:
            graph = self.graphs.get(client_id, step.step_id)
            if graph is None and inputs is None:
                raise _graph_missing(step)
            if graph is None:
                assert inputs is not None
                graph = self._forward_with_graph(inputs, step.client_layers)
            grad_output = check_grad_output(tensors, tuple(graph.output.shape))
            self.graphs.discard(client_id, step.step_id)
            return self._grads(graph.output, graph.inputs, grad_output)

        grads, queued = self._submit(client_id, inputs, run)
        return grads, step.reply(graph_held=False, queue_ms=queued)

    def loss(self, tensors: Tensors, meta: dict[str, Any], client_id: str) -> tuple[Tensors, dict[str, Any]]:
        """head=server, one round trip: `loss_sum` over the supervised targets and, unless meta `grad`
        is false, `grad_hidden` (B, T, d) and `grad_prefix_kv` (L - K, 2, n_kv, P, hd).

        The norm and head run on the supervised rows only (they act per token, so this is exact), and
        the cross-entropy in fp32: no (B, T, V) tensor is ever built.
        """
        step = check_meta(meta, self.shape, forward=True)
        check_head(step, "server", schemas.LOSS_PATH)
        check_names(tensors, forward_names(step.head), "loss request")
        inputs = check_forward_inputs(tensors, self.shape)
        targets = check_targets(tensors, inputs, self.dims.vocab_size).to(self.settings.device)
        supervised = targets != schemas.IGNORE_TARGET  # (B, T)

        def run() -> Tensors:
            with torch.set_grad_enabled(step.grad):
                last, leaves = self._run(inputs, requires_grad=step.grad)  # (B, T, d)
                logits = self.top.head(last[supervised])  # (N, V)
                loss = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
                out = {schemas.LOSS_SUM: loss.detach().float().cpu()}
                if step.grad:
                    out |= self._grads(loss, leaves, torch.ones_like(loss))
            return out

        out, queued = self._submit(client_id, inputs, run)
        return out, step.reply(n_tokens=int(supervised.sum()), queue_ms=queued)

    def _submit(
        self, client_id: str, inputs: ForwardInputs | None, run: Callable[[], Any]
    ) -> tuple[Any, float]:
        """`run()` as a training job of the scheduler, costing its tokens; its result and queue time (ms)."""
        cost = 1 if inputs is None else int(inputs.attention_mask.shape[0] * inputs.hidden.shape[1])
        result, queued_s = self.scheduler.submit(Job(client_id, urgent=False, cost=cost, run=run))
        return result, round(1000 * queued_s, 3)

    def _before_layer(self, _: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Before each layer: stop for a client that is gone, and let waiting generation steps run
        (here, and again when the backward reaches this layer)."""
        check()
        self.scheduler.preempt()
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._before_layer_backward)

    def _before_layer_backward(self, _: torch.Tensor) -> None:
        self.scheduler.preempt()

    def _forward_with_graph(self, inputs: ForwardInputs, client_layers: int = 0) -> HeldGraph:
        """A forward whose graph waits for its backward: each layer keeps only its input (B, T, d)
        and recomputes its inside on the backward, so that a held graph costs about B x T x d per
        layer rather than every activation of every layer."""
        saved = SavedBytes(self._weights)
        with torch.enable_grad(), saved.measure():
            output, leaves = self._run(
                inputs, requires_grad=True, checkpointed=True, client_layers=client_layers
            )
        for leaf in (*leaves, output):
            saved.add(leaf)
        # the layers' inputs, which the checkpoints keep, are not saved tensors that autograd reports
        layer_inputs = (len(self.stacks[client_layers].layers) - 1) * output.nbytes
        return HeldGraph(output=output, inputs=leaves, nbytes=saved.nbytes + layer_inputs)

    def _run(
        self, inputs: ForwardInputs, requires_grad: bool, checkpointed: bool = False, client_layers: int = 0
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The hidden states (B, T, d) after layer L - M and the input leaves, computed like the whole model."""
        stack = self.stacks[client_layers]
        device = self.settings.device
        hidden = inputs.hidden.to(device, self.dtype).requires_grad_(requires_grad)  # (B, T, d)
        kv = inputs.prefix_kv.to(device, self.dtype).requires_grad_(requires_grad)  # (L - K, 2, n_kv, P, hd)
        x = Activations(hidden, inputs.attention_mask.to(device), inputs.positions.to(device))
        # an empty prefix is no prefix: the cache would hold zero-length layers
        layers_kv = kv if inputs.prefix_len else None
        if checkpointed:
            return stack.forward_checkpointed(x, layers_kv), (hidden, kv)
        cache = (
            None
            if layers_kv is None
            else prefix_cache(kv, self.config, hidden.shape[0], self.settings.split_at)
        )
        return stack(x, cache), (hidden, kv)

    def _grads(
        self, output: torch.Tensor, leaves: tuple[torch.Tensor, torch.Tensor], grad_output: torch.Tensor
    ) -> Tensors:
        """d output / d (hidden, prefix_kv), weighted by `grad_output`; fp16 with loss scaling."""
        grad = grad_output.to(output.device, torch.float32)  # cast to fp16 only once scaled
        hidden, kv = leaves
        # the prefix is unused when P = 0, and a loss over N = 0 targets uses nothing
        g_hidden, g_kv = scaled_grad(output, (hidden, kv), grad, self.dtype)
        return {
            schemas.GRAD_HIDDEN: _or_zeros(g_hidden, hidden),
            schemas.GRAD_PREFIX: _or_zeros(g_kv, kv),
        }


FP16_SCALES = tuple(2.0**e for e in range(16, -1, -2))
"""Loss scales an fp16 backward tries, largest first, until every gradient is finite."""


def scaled_grad(
    output: torch.Tensor, leaves: tuple[torch.Tensor, ...], grad: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor | None, ...]:
    """`torch.autograd.grad` for the fp32 `grad`. An fp16 backward scales `grad` by the largest of
    `FP16_SCALES` whose gradients stay finite, so small gradients do not underflow to zero, and
    unscales them in fp32."""
    if dtype != torch.float16:
        return torch.autograd.grad(output, leaves, grad.to(output.dtype), allow_unused=True)
    for scale in FP16_SCALES:
        last = scale == FP16_SCALES[-1]
        scaled = (grad * scale).to(output.dtype)
        grads = torch.autograd.grad(output, leaves, scaled, allow_unused=True, retain_graph=not last)
        if all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return tuple(None if g is None else g.float() / scale for g in grads)
    raise RequestError(
        422,
        "non_finite",
        "the fp16 backward overflowed even without loss scaling; serve with --dtype bf16 or fp32",
    )


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

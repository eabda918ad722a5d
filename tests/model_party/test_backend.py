"""The server's top must load only its part and compute exactly what the whole model computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model, build_tiny_tokenizer
from splitprefix.errors import ConfigError
from splitprefix.model.emulator import bottom_fingerprint, config_fingerprint, tokenizer_fingerprint
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.prefixed import forward_with_prefix
from splitprefix.model.registry import architecture_of
from splitprefix.model.split import Bottom, Head
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.graphs import SavedBytes
from splitprefix.model_party.settings import ServerSettings
from splitprefix.model_party.validation import RequestError, check_forward_inputs
from splitprefix.wire import schemas
from top_helpers import EXACT, GRADS, SPLIT_AT, local_step, save_model_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """arch -> (whole model loaded the usual way, backend on the same directory), built once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            directory = save_model_dir(tmp_path_factory.mktemp(arch), arch)
            cache[arch] = (
                load_causal_lm(directory),
                TopBackend(ServerSettings(directory, SPLIT_AT, head="both")),
            )
        return cache[arch]

    return get


def _client_loss(model, output, step, weights):
    """The data party's loss on the server's output: logits at real positions, weighted."""
    return (Head(model)(output)[step.mask.bool()] * weights).sum()


def test_top_loads_only_its_part_and_knows_the_whole_models_fingerprints(arch, served, tmp_path):
    # Prepare
    model, backend = served(arch)
    top = backend.top

    # Assert: fingerprints equal those of the whole model
    assert top.bottom_sha256 == bottom_fingerprint(model, SPLIT_AT)
    assert top.base_config_sha256 == config_fingerprint(model)
    assert top.tokenizer_sha256 == tokenizer_fingerprint(load_tokenizer(backend.settings.model_dir))
    # Assert: the bottom's weights were dropped, the top's are real and frozen
    assert all(p.is_meta for p in Bottom(top.model, SPLIT_AT).parameters())
    for part in (top.stack, top.head):
        assert not any(p.is_meta or p.requires_grad for p in part.parameters())
    assert architecture_of(top.model.config).name == arch


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_top_output_equals_the_whole_model(arch, served, padding):
    # Prepare
    model, backend = served(arch)
    step = local_step(model, "client", backend.top.bottom_sha256, padding)

    # Execute
    out, reply = backend.forward(step.tensors, step.meta | {"keep_graph": False}, "alice")
    with torch.no_grad():
        expected = forward_with_prefix(model, step.ids, step.mask, step.kv)  # (B, T, V)
        real = step.mask.bool()
        actual = Head(model)(out["output"])[real]

    # Assert
    assert reply["graph_held"] is False and reply["step_id"] == step.meta["step_id"]
    assert out["output"].shape == (3, 7, 64)
    torch.testing.assert_close(actual, expected[real], **EXACT)


def test_an_empty_prefix_gives_the_base_model(served):
    # Prepare
    model, backend = served("llama")
    step = local_step(model, "client", backend.top.bottom_sha256, "left", prefix_len=0)

    # Execute
    out, _ = backend.forward(step.tensors, step.meta | {"step_id": "no-prefix"}, "alice")
    grads, _ = backend.backward(
        {"grad_output": torch.ones_like(out["output"])}, step.meta | {"step_id": "no-prefix"}, "alice"
    )

    # Assert
    with torch.no_grad():
        expected = forward_with_prefix(model, step.ids, step.mask, None)
        actual = Head(model)(out["output"])
    torch.testing.assert_close(actual[step.mask.bool()], expected[step.mask.bool()], **EXACT)
    assert grads["grad_prefix_kv"].shape == (2, 2, model.config.num_key_value_heads, 0, 16)


def _whole_model_grads(model, step, loss_of_logits):
    """The loss of the whole model's logits (B, T, V) and its gradients w.r.t. the layer-K hidden
    states and the top prefix."""
    kv = step.kv.clone().requires_grad_(True)
    captured = {}

    def keep_output(_module, _inputs, output):
        output.retain_grad()
        captured["hidden"] = output

    layer = architecture_of(model.config).layers_of(model)[SPLIT_AT - 1]
    handle = layer.register_forward_hook(keep_output)
    try:
        logits = forward_with_prefix(model, step.ids, step.mask, kv)
    finally:
        handle.remove()
    loss = loss_of_logits(logits)
    loss.backward()
    return loss.detach(), captured["hidden"].grad, kv.grad[SPLIT_AT:]


@pytest.mark.parametrize("path", ["held", "recompute"])
def test_backward_equals_autograd_through_the_whole_model(arch, served, path):
    # Prepare
    model, backend = served(arch)
    step = local_step(model, "client", backend.top.bottom_sha256, "left", step_id=f"grad-{path}")
    weights = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    _, expected_hidden, expected_kv = _whole_model_grads(
        model, step, lambda logits: (logits[step.mask.bool()] * weights).sum()
    )

    # Execute: forward, the data party's loss on the output, backward
    keep = path == "held"
    out, reply = backend.forward(step.tensors, step.meta | {"keep_graph": keep}, "alice")
    output = out["output"].requires_grad_(True)
    (grad_output,) = torch.autograd.grad(_client_loss(model, output, step, weights), output)
    request = {"grad_output": grad_output} | ({} if keep else step.tensors)
    grads, _ = backend.backward(request, step.meta, "alice")

    # Assert
    assert reply["graph_held"] is keep
    torch.testing.assert_close(grads["grad_hidden"], expected_hidden, **GRADS)
    torch.testing.assert_close(grads["grad_prefix_kv"], expected_kv, **GRADS)


@pytest.mark.parametrize("padding", [None, "left"])
def test_the_head_server_loss_and_its_gradients_equal_the_whole_models(arch, served, padding):
    # Prepare: the whole model's summed cross-entropy on the same targets
    model, backend = served(arch)
    step = local_step(model, "server", backend.top.bottom_sha256, padding, step_id="loss")
    targets = step.tensors[schemas.TARGETS]
    kept = targets != schemas.IGNORE_TARGET
    expected_loss, expected_hidden, expected_kv = _whole_model_grads(
        model, step, lambda logits: F.cross_entropy(logits[kept], targets[kept], reduction="sum")
    )

    # Execute: one round trip, and the same request asking for the loss alone
    out, reply = backend.loss(step.tensors, step.meta, "alice")
    plain, _ = backend.loss(step.tensors, step.meta | {"grad": False}, "alice")

    # Assert: nothing of size V comes back
    assert reply["n_tokens"] == int(kept.sum())
    assert set(out) == {schemas.LOSS_SUM, schemas.GRAD_HIDDEN, schemas.GRAD_PREFIX} and set(plain) == {
        "loss_sum"
    }
    torch.testing.assert_close(out["loss_sum"], expected_loss, **GRADS)
    torch.testing.assert_close(plain["loss_sum"], out["loss_sum"], rtol=0, atol=0)
    torch.testing.assert_close(out["grad_hidden"], expected_hidden, **GRADS)
    torch.testing.assert_close(out["grad_prefix_kv"], expected_kv, **GRADS)
    assert len(backend.graphs) == 0  # one round trip: nothing is held


def _expect_graph_missing(backend, step, client):
    grad = {"grad_output": torch.zeros(3, 7, 64)}
    with pytest.raises(RequestError, match="resend this backward with the forward inputs") as info:
        backend.backward(grad, step.meta, client)
    assert (info.value.status, info.value.code) == (409, "graph_missing")


def test_a_graph_serves_one_backward_and_only_its_own_client(served):
    # Prepare
    model, backend = served("qwen2")
    step = local_step(model, "client", backend.top.bottom_sha256, step_id="isolation")
    backend.forward(step.tensors, step.meta, "alice")

    # Execute / Assert: bob cannot use alice's graph; alice can, once
    _expect_graph_missing(backend, step, "bob")
    backend.backward({"grad_output": torch.ones(3, 7, 64)}, step.meta, "alice")
    _expect_graph_missing(backend, step, "alice")


def test_a_forward_without_keep_graph_holds_nothing(served):
    model, backend = served("qwen2")
    step = local_step(model, "client", backend.top.bottom_sha256, step_id="stateless")
    backend.forward(step.tensors, step.meta | {"keep_graph": False}, "alice")
    _expect_graph_missing(backend, step, "alice")


def test_graph_caps_evict_and_the_backward_then_needs_the_inputs(tmp_path):
    # Prepare: one graph per client
    directory = save_model_dir(tmp_path, "llama")
    backend = TopBackend(ServerSettings(directory, SPLIT_AT, max_graphs_per_client=1))
    model = load_causal_lm(directory)
    first = local_step(model, "client", backend.top.bottom_sha256, step_id="first")
    second = local_step(model, "client", backend.top.bottom_sha256, step_id="second")

    # Execute
    backend.forward(first.tensors, first.meta, "alice")
    backend.forward(second.tensors, second.meta, "alice")

    # Assert: the older graph is gone, the newer one serves; the recompute path still works
    _expect_graph_missing(backend, first, "alice")
    backend.backward({"grad_output": torch.ones(3, 7, 64)}, second.meta, "alice")
    grads, _ = backend.backward({"grad_output": torch.ones(3, 7, 64)} | first.tensors, first.meta, "alice")
    assert grads["grad_hidden"].abs().sum() > 0


def test_a_graph_over_the_memory_cap_is_not_held(tmp_path):
    directory = save_model_dir(tmp_path, "gpt2")
    backend = TopBackend(ServerSettings(directory, SPLIT_AT, max_graph_bytes=1000))
    step = local_step(load_causal_lm(directory), "client", backend.top.bottom_sha256)
    _, reply = backend.forward(step.tensors, step.meta, "alice")
    assert reply["graph_held"] is False
    _expect_graph_missing(backend, step, "alice")


def test_a_sharded_checkpoint_loads_the_same_top(served, tmp_path):
    # Prepare: the same model saved in several shards with an index
    model, backend = served("mistral")
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    build_tiny_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()

    # Execute
    sharded = TopBackend(ServerSettings(tmp_path, SPLIT_AT, head="both"))
    step = local_step(model, "client", backend.top.bottom_sha256)
    expected, _ = backend.forward(step.tensors, step.meta | {"keep_graph": False}, "alice")
    actual, _ = sharded.forward(step.tensors, step.meta | {"keep_graph": False}, "alice")

    # Assert
    assert sharded.top.bottom_sha256 == backend.top.bottom_sha256
    torch.testing.assert_close(actual["output"], expected["output"], rtol=0, atol=0)


def test_a_directory_without_safetensors_is_refused(tmp_path):
    build_tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"has no model\.safetensors or model\.safetensors\.index\.json"):
        TopBackend(ServerSettings(tmp_path, SPLIT_AT))


def test_bf16_compute_stays_close_to_fp32(served, tmp_path):
    # Prepare
    model, backend = served("llama")
    low = TopBackend(ServerSettings(backend.settings.model_dir, SPLIT_AT, head="both", dtype="bf16"))
    step = local_step(model, "client", backend.top.bottom_sha256, step_id="bf16")

    # Execute
    reference, _ = backend.forward(step.tensors, step.meta | {"keep_graph": False}, "alice")
    out, _ = low.forward(step.tensors, step.meta, "alice")
    grads, _ = low.backward({"grad_output": torch.ones(3, 7, 64)}, step.meta, "alice")

    # Assert: results come back as fp32 and within bf16 precision
    assert out["output"].dtype == grads["grad_prefix_kv"].dtype == torch.float32
    torch.testing.assert_close(out["output"], reference["output"], atol=0.1, rtol=0.05)


def test_the_server_computes_in_the_checkpoints_own_dtype_by_default(tmp_path):
    # Prepare: a checkpoint stored in bf16
    build_tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    build_tiny_tokenizer().save_pretrained(tmp_path)

    # Execute
    backend = TopBackend(ServerSettings(tmp_path, SPLIT_AT))

    # Assert
    assert backend.dtype == torch.bfloat16
    assert {p.dtype for p in backend.top.stack.parameters()} == {torch.bfloat16}


def test_an_fp16_backward_scales_the_loss_so_small_gradients_survive(served):
    # Prepare: gradients so small that fp16 flushes most of them to zero without scaling
    model, backend = served("llama")
    half = TopBackend(ServerSettings(backend.settings.model_dir, SPLIT_AT, dtype="fp16"))
    step = local_step(model, "client", backend.top.bottom_sha256, step_id="fp16")
    ones, tiny = torch.ones(3, 7, 64), torch.full((3, 7, 64), 1e-7)
    graph = half._forward_with_graph(check_forward_inputs(step.tensors, half.shape))
    (plain,) = torch.autograd.grad(graph.output, graph.inputs[1], tiny.half())
    assert (plain == 0).float().mean() > 0.5  # the attack on an unscaled backward

    # Execute
    grads, _ = half.backward({"grad_output": tiny} | step.tensors, step.meta, "alice")
    unit, _ = half.backward({"grad_output": ones} | step.tensors, step.meta, "alice")

    # Assert: the scaled backward of 1e-7 is 1e-7 times the backward of 1, in fp32
    for name in ("grad_hidden", "grad_prefix_kv"):
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], unit[name] * 1e-7, rtol=0.05, atol=1e-10)


def test_a_held_graph_keeps_about_one_hidden_state_per_layer(served):
    # Prepare
    model, backend = served("llama")
    step = local_step(model, "client", backend.top.bottom_sha256, step_id="checkpointed")
    inputs = check_forward_inputs(step.tensors, backend.shape)
    everything = SavedBytes(backend._weights)
    with torch.enable_grad(), everything.measure():
        backend._run(inputs, requires_grad=True)  # the same forward, every activation saved

    # Execute
    graph = backend._forward_with_graph(inputs)

    # Assert: inputs, output, one (B, T, d) state per layer and the masks and rotary tables (about
    # one more), a fraction of all the activations
    hidden, kv = graph.inputs
    layers = len(backend.top.stack.layers)
    assert graph.nbytes <= (layers + 3) * hidden.nbytes + kv.nbytes
    assert graph.nbytes * 3 < everything.nbytes

"""Merged generation steps answer each session as it would be answered alone.

Sessions of different parties, with different prefix lengths, prompt lengths, batch sizes and head
modes, step once alone and once merged into one forward by the scheduler; then whole greedy
generations of concurrent parties over a real server equal the whole model's `generate`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import random_batch
from live_server import LiveServer
from split_helpers import make_dirs, server_settings
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.prefix import Prefix, PrefixConfig
from splitprefix.model.prefixed import generate_with_prefix
from splitprefix.model_party.app import create_app
from splitprefix.model_party.backend import TopBackend
from splitprefix.model_party.generation import GenerationBackend
from splitprefix.model_party.session_cache import padded_cache
from splitprefix.model_party.settings import ServerSettings
from splitprefix.wire import schemas
from top_helpers import SPLIT_AT, save_model_dir

# (party, head, prefix length P, prompt length T, rows, left-padding of row 1)
SESSIONS = [
    ("alice", "server", 0, 3, 1, 0),
    ("bob", "client", 2, 6, 2, 2),
    ("carol", "server", 5, 1, 1, 0),
    ("alice", "server", 1, 4, 2, 1),
]
STEPS = 3
CLOSE = dict(atol=1e-5, rtol=1e-5)


def _open(generation: GenerationBackend, spec: tuple, seed: int) -> str:
    party, head, prefix_len, prompt_len, rows, pad = spec
    d, gen = generation.backend.dims, torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, prompt_len, dtype=torch.long)
    mask[1:, :pad] = 0
    tensors = {
        "hidden": torch.randn(rows, prompt_len, d.hidden_size, generator=gen),
        "token_mask": mask,
        "positions": (mask.cumsum(1) - 1).clamp(min=0) + prefix_len,
        "prefix_kv": torch.randn(
            d.num_layers - SPLIT_AT, 2, d.num_kv_heads, prefix_len, d.head_dim, generator=gen
        ),
    }
    meta = _meta(head, "open") | {
        "split_at": SPLIT_AT,
        "bottom_sha256": generation.backend.top.bottom_sha256,
        "max_length": prefix_len + prompt_len + STEPS,
        "top_k": 5 if head == "server" else 0,
    }
    return generation.open(tensors, meta, party)[1]["session_id"]


def _meta(head: str, step_id: str) -> dict:
    return {
        "protocol_version": schemas.PROTOCOL_VERSION,
        "step_id": step_id,
        "head": head,
        "wire_dtype": "fp32",
    }


def _step_inputs(generation: GenerationBackend, step: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    return [
        {"hidden": torch.randn(s[4], 1, generation.backend.dims.hidden_size, generator=gen)} for s in SESSIONS
    ]


def _merged_step(
    generation: GenerationBackend, ids: list[str], inputs: list[dict], step_id: str
) -> list[dict]:
    """Every session's step queued while the worker is held, so that they run as one forward."""
    answers: list = [None] * len(ids)
    scheduler = generation.scheduler

    def step(i: int) -> None:
        spec = SESSIONS[i]
        answers[i] = generation.step(ids[i], inputs[i], _meta(spec[1], step_id), spec[0])[0]

    threads = [threading.Thread(target=step, args=(i,)) for i in range(len(ids))]
    with scheduler.busy:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while sum(len(q) for q in scheduler._urgent.values()) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=30)
    assert scheduler.merged_rows[-1] == sum(s[4] for s in SESSIONS)  # one forward for all
    return answers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-sliding", "falcon-alibi"])
def test_merged_steps_answer_each_session_as_alone(tmp_path, arch):
    # Prepare: the same sessions twice on one server
    settings = ServerSettings(save_model_dir(tmp_path, arch), SPLIT_AT)
    generation = GenerationBackend(TopBackend(settings))
    alone = [_open(generation, spec, seed) for seed, spec in enumerate(SESSIONS)]
    merged = [_open(generation, spec, seed) for seed, spec in enumerate(SESSIONS)]

    for step in range(STEPS):
        inputs = _step_inputs(generation, step)
        # Execute: one set step by step alone, the other merged
        solo = []
        for i, spec in enumerate(SESSIONS):
            solo.append(generation.step(alone[i], inputs[i], _meta(spec[1], f"s{step}"), spec[0])[0])
            assert generation.scheduler.merged_rows[-1] == spec[4]
        together = _merged_step(generation, merged, inputs, f"s{step}")

        # Assert: the same answer (the best tokens exactly) for every session
        for one, other in zip(solo, together, strict=True):
            assert one.keys() == other.keys()
            if schemas.TOP_INDICES in one:
                assert torch.equal(one[schemas.TOP_INDICES], other[schemas.TOP_INDICES])
            for name in one:
                torch.testing.assert_close(one[name], other[name], **CLOSE)


def _prefix(config, prefix_len: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return Prefix(PrefixConfig.for_model(config, prefix_len))().detach()


def test_concurrent_parties_generate_greedily_as_the_whole_model(tmp_path):
    # Prepare: three parties with their own prompts, prefixes and head modes on one server
    dirs = make_dirs(tmp_path)
    whole = load_causal_lm(dirs.full)
    parties = [("server", 2, 1, 5), ("client", 4, 2, 7), ("server", 0, 1, 3)]  # head, P, rows, T
    inputs = []
    for seed, (_, prefix_len, rows, length) in enumerate(parties):
        ids, mask = random_batch(batch=rows, length=length, padding="left", seed=seed)
        kv = _prefix(whole.config, prefix_len, seed) if prefix_len else None
        inputs.append((ids, mask, kv, generate_with_prefix(whole, ids, mask, kv, 12, pad_token_id=0)))
    results: list = [None] * len(parties)
    backend = TopBackend(server_settings(dirs))
    app = create_app(backend)

    def party(i: int, url: str) -> None:
        ids, mask, kv, _ = inputs[i]
        with SplitModel.open(dirs.emulator, ClientSettings(url, head=parties[i][0])) as model:
            if kv is not None:
                model.kv = kv
            for _ in range(3):  # several generations each, so that they overlap
                results[i] = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=12))

    # Execute
    with LiveServer(app) as server:
        threads = [threading.Thread(target=party, args=(i, server.url)) for i in range(len(parties))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    # Assert: every party got the whole model's tokens, and steps of several sessions did merge
    for (_, _, _, expected), generated in zip(inputs, results, strict=True):
        assert torch.equal(generated, expected)
    assert max(backend.scheduler.merged_rows) > 2


def test_a_session_alone_steps_on_its_own_buffers_and_merged_ones_are_copied_once(tmp_path):
    # Prepare: two sessions of different lengths on one server
    generation = GenerationBackend(TopBackend(ServerSettings(save_model_dir(tmp_path, "llama"), SPLIT_AT)))
    ids = [_open(generation, spec, seed) for seed, spec in enumerate(SESSIONS[:3:2])]  # one row each
    a, b = (generation.sessions.get(spec[0], i).cache for spec, i in zip(SESSIONS[:3:2], ids, strict=True))
    length = max(a.length, b.length)

    # Execute
    alone = padded_cache(generation.backend.config, [a], a.length, 1)
    merged = padded_cache(generation.backend.config, [a, b], length, 1)

    # Assert: alone, every layer is a view of the session's buffers; merged, one buffer per layer
    # with room for the new key, each session's keys right-aligned in its rows
    for j, at in enumerate(range(SPLIT_AT, SPLIT_AT + len(a.keys))):
        layer = alone.layers[at]
        assert layer.keys.data_ptr() == a.keys[j].data_ptr() and layer.keys.shape[2] == a.length
        buffer = merged.layers[at].buffers[0]
        assert buffer.shape[:3] == (2, a.keys[j].shape[1], length + 1)
        assert torch.equal(buffer[0, :, length - a.length : length], a.keys[j][0, :, : a.length])
        assert not buffer[0, :, : length - a.length].any() and a.length < length  # padding: zeros
        assert torch.equal(buffer[1, :, :length], b.keys[j][0, :, :length])
    with pytest.raises(ValueError, match="holds"):  # a step beyond the room it was given
        merged.layers[SPLIT_AT].update(*(torch.zeros(2, a.keys[0].shape[1], 2, a.keys[0].shape[3]),) * 2)

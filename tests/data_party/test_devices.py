"""Both parties on one device, in fp32 and bf16: split generation against HF `generate` on the whole
model in the same dtype, and split training against the whole model's in fp32 on the CPU.

Each test runs on the CPU, and again on CUDA where a GPU is present (those cases are marked
`gpu`: `python -m pytest -m gpu` runs only them; CI has no GPU).
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_batch
from live_server import LiveServer
from split_helpers import SHORT_RUN, encoded_examples, make_dirs, seeded_prefix, server_settings
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data_party.generate import GenerationConfig, SplitModel
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import local_loss_fn, train_prefix
from splitprefix.model.loading import load_causal_lm
from splitprefix.model.prefixed import generate_with_prefix
from splitprefix.model_party.app import create_app
from splitprefix.runtime import RuntimeSettings

ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
PLACES = [
    pytest.param((device, dtype), id=f"{device}-{dtype}", marks=ON_GPU if device == "cuda" else ())
    for device in ("cpu", "cuda")
    for dtype in ("fp32", "bf16")
]


@pytest.fixture(scope="module", params=PLACES)
def served(request, tmp_path_factory):
    """(dirs, runtime, server computing on the runtime's device and dtype)."""
    device, dtype = request.param
    dirs = make_dirs(tmp_path_factory.mktemp("models"))
    settings = server_settings(dirs, device=device, dtype=dtype)
    with LiveServer(create_app(settings)) as live:
        yield dirs, RuntimeSettings(device=device, dtype=dtype), live


def test_greedy_split_generation_on_the_device_equals_hf_generate(served):
    # Prepare: the whole model on the device, in the same dtype as both parties
    dirs, runtime, server = served
    whole = load_causal_lm(dirs.full, runtime.torch_dtype, device=runtime.device)
    ids, mask = random_batch(batch=3, length=7, padding="left")
    kv = seeded_prefix(whole.config)().detach()
    expected = generate_with_prefix(whole, ids, mask, kv, 8, pad_token_id=0).cpu()

    # Execute
    with SplitModel.open(dirs.emulator, ClientSettings(server.url, head="client"), runtime=runtime) as model:
        model.kv = kv
        generated = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=8))

    # Assert: the same ops in the same dtype; on a GPU, bf16 kernels may break near-ties otherwise
    agreement = (generated == expected).float().mean().item()
    assert agreement == 1.0 if runtime.device == "cpu" or runtime.dtype == "fp32" else agreement >= 0.9


@pytest.mark.parametrize("head", ["client", "server"])
def test_split_training_on_the_device_follows_the_whole_models(served, head):
    # Prepare: the reference run on the whole model on the CPU in fp32
    dirs, runtime, server = served
    full = load_causal_lm(dirs.full)
    tok_source = open_split(dirs.emulator, ClientSettings(server.url, head=head))
    tok = tok_source.tokenizer
    tok_source.close()
    reference = seeded_prefix(full.config)
    whole = train_prefix(
        reference, local_loss_fn(full), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
    )

    # Execute: the same run through the split, both parties on the device
    session = open_split(dirs.emulator, ClientSettings(server.url, head=head), runtime=runtime)
    try:
        prefix = seeded_prefix(full.config)
        split = train_prefix(prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN)
    finally:
        session.close()

    # Assert: fp32 matches to float rounding; bf16 within its precision
    tolerance = dict(atol=1e-4, rtol=1e-4) if runtime.dtype == "fp32" else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(torch.tensor(split.losses), torch.tensor(whole.losses), **tolerance)
    assert {p.dtype for p in prefix.parameters()} == {torch.float32}

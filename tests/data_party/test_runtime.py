"""The data party's device and dtype: checked settings, bf16 on the CPU end to end, fp32 prefix."""

from __future__ import annotations

import pytest
import torch

from split_helpers import EXAMPLES, SHORT_RUN, encoded_examples, seeded_prefix
from splitprefix.data.batching import resolve_pad_id
from splitprefix.data_party.generate import SplitModel, split_scorer
from splitprefix.data_party.remote import ClientSettings
from splitprefix.data_party.sampling import GenerationConfig
from splitprefix.data_party.session import open_split
from splitprefix.data_party.train import train_prefix
from splitprefix.errors import ConfigError
from splitprefix.evaluation.evaluate import EvalConfig, evaluate
from splitprefix.model.loading import load_causal_lm
from splitprefix.runtime import RuntimeSettings

BF16 = RuntimeSettings(dtype="bf16")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "fp64"}, r"dtype must be one of \['bf16', 'fp16', 'fp32'\]; got 'fp64'"),
        ({"device": "gpu"}, "device must be cpu, cuda, cuda:N or mps; got 'gpu'"),
        ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "cuda"),
    ],
)
def test_bad_runtime_settings_are_refused_with_what_to_do(changes, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeSettings(**changes)


def _train(dirs, url, head, runtime):
    session = open_split(dirs.emulator, ClientSettings(url, head=head), runtime=runtime)
    try:
        prefix = seeded_prefix(load_causal_lm(dirs.full).config)
        tok = session.tokenizer
        history = train_prefix(
            prefix, session.loss_fn(), encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN
        )
        return session, prefix, history.losses
    finally:
        session.close()


@pytest.mark.parametrize("head", ["client", "server"])
def test_bf16_split_training_keeps_the_prefix_in_fp32_and_stays_close_to_fp32(dirs, server, head):
    # Execute: the same run in fp32 and with the data party's parts in bf16
    _, _, reference = _train(dirs, server.url, head, RuntimeSettings())
    session, prefix, losses = _train(dirs, server.url, head, BF16)

    # Assert: bf16 parts, fp32 prefix and gradients, losses within bf16 precision of fp32's
    assert {p.dtype for p in session.bottom.parameters()} == {torch.bfloat16}
    assert session.head is None or {p.dtype for p in session.head.parameters()} == {torch.bfloat16}
    assert (
        {p.dtype for p in prefix.parameters()}
        == {p.grad.dtype for p in prefix.parameters()}
        == {torch.float32}
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=0.05, rtol=0.02)


def test_bf16_evaluation_and_generation_run_through_the_split(dirs, server):
    # Prepare
    kv = seeded_prefix(load_causal_lm(dirs.full).config)().detach()
    model = SplitModel.open(dirs.emulator, ClientSettings(server.url, head="client"), runtime=BF16)
    model.kv = kv
    try:
        # Execute
        report = evaluate(
            split_scorer(model.split), model.tokenizer, EXAMPLES[:4], kv, EvalConfig(max_new_tokens=3)
        )
        ids, mask = model.encode(["Customer: refund please", "hello"])
        tokens = model.generate_ids(ids, mask, GenerationConfig(max_new_tokens=4, do_sample=True, seed=1))
    finally:
        model.close()

    # Assert: answers come back on the CPU, as token ids
    assert report["n_examples"] == 4 and 0 <= report["exact_match"] <= 1 and report["loss"] > 0
    assert tokens.device.type == "cpu" and tokens.dtype == torch.long and tokens.shape[0] == 2

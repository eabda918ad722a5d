"""The U-shaped split (the data party keeps the bottom K and the top M layers) equals the whole
model: loss and prefix gradients for every registry family, and a short training run.

The server's layers [K, L - M) run in this process behind RemoteTop's interface (`LocalTop`)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, random_batch
from families import FAMILY_VARIANTS
from split_helpers import SHORT_RUN, TIGHT, encoded_examples, make_dirs, seeded_prefix
from splitprefix.audit.observe import LocalTop
from splitprefix.data.batching import Batch, resolve_pad_id
from splitprefix.data_party.train import local_loss_fn, train_prefix
from splitprefix.data_party.u_split import ClientTop, check_client_layers, u_split_loss_fn
from splitprefix.errors import ConfigError
from splitprefix.model.loading import load_causal_lm, load_tokenizer
from splitprefix.model.split import Bottom

K = 1
GRAD = dict(atol=1e-7, rtol=1e-5)


def u_loss_fn(model, client_layers: int):
    top = LocalTop(model, K, "client", client_layers)
    return u_split_loss_fn(Bottom(model, K), top, ClientTop(model, client_layers), K)


def loss_and_grad(loss_fn, batch: Batch, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kv = kv.detach().requires_grad_(True)
    loss, _ = loss_fn(batch, kv)
    loss.backward()
    return loss.detach(), kv.grad


@pytest.mark.parametrize("variant", sorted(FAMILY_VARIANTS))
@pytest.mark.parametrize("client_layers", [1, 2])
def test_u_split_loss_and_prefix_gradients_equal_the_whole_model(variant, client_layers):
    # Prepare: right padding, a prefix over all 4 layers, labels on the second half of each row
    model = build_tiny_model(variant)
    ids, mask = random_batch(batch=3, length=10, padding="right")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    batch = Batch(ids, mask, labels)
    kv = seeded_prefix(model.config)().detach()

    # Execute
    expected = loss_and_grad(local_loss_fn(model), batch, kv)
    actual = loss_and_grad(u_loss_fn(model, client_layers), batch, kv)

    # Assert: equal loss and gradients, and the kept top layers' prefix gets a gradient
    torch.testing.assert_close(actual[0], expected[0], **TIGHT)
    torch.testing.assert_close(actual[1], expected[1], **GRAD)
    assert (actual[1][-client_layers:].abs().amax() > 0).all()


def test_u_split_training_equals_whole_model_training(tmp_path):
    # Prepare
    dirs = make_dirs(tmp_path)
    model, tok = load_causal_lm(dirs.full), load_tokenizer(dirs.full)
    runs = []

    # Execute: the same seeded run through the whole model and through the U-split (M = 2)
    for loss_fn in (local_loss_fn(model), u_loss_fn(model, 2)):
        prefix = seeded_prefix(model.config)
        history = train_prefix(prefix, loss_fn, encoded_examples(tok), resolve_pad_id(tok), SHORT_RUN)
        runs.append((torch.tensor(history.losses), prefix().detach()))

    # Assert
    torch.testing.assert_close(runs[1][0], runs[0][0], **TIGHT)
    torch.testing.assert_close(runs[1][1], runs[0][1], **TIGHT)


@pytest.mark.parametrize("client_layers", [-1, 3, 4])
def test_client_layers_that_leave_the_server_no_layer_are_refused(client_layers):
    with pytest.raises(ConfigError, match="client_layers"):
        check_client_layers(K, client_layers, 4)

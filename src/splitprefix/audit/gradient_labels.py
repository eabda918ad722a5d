"""What head=client (and the U-shaped split) reveals: targets inverted from the gradient sent back.

With head=client the model party computed h_L itself, owns the final norm and head, and receives
g_t = dL/dh_L,t for every position t. For the summed cross-entropy, at each supervised position

    g_t = a * J_t^T (softmax(z_t) - onehot(y_t)),    J_t = d z_t / d h_L,t   (V, d), a > 0,

so for each candidate v the attacker forms c_v = J_t^T p_t - J_t[v] and picks the v whose c_v points
along g_t (largest cosine; scale-free, so a mean or any positive loss weight does not hide y).
It is exact: c_y is g_t up to the factor a. Positions whose gradient is exactly zero are the
unsupervised ones, so the prompt's end shows too.

With the U-split the gradient is dL/dh_{L-M}: the attacker must also run the data party's top M
layers, whose prefix it does not have. Its best effort: run them with an estimate of the prefix
(none, or zeros of the observed length P), and take J_t through them as J_head(h^L_t) E_t with
E_t = sum_s d h^L_s / d h_t (the residual stream keeps E_t near identity; the cross-position terms
that attention adds are what it cannot separate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import jacfwd, vmap
from transformers import PreTrainedModel

from splitprefix.audit.observe import LocalTop
from splitprefix.data.batching import IGNORE_INDEX, EncodedExample, collate
from splitprefix.data_party.gradient_noise import GradientNoise, GradientNoiser
from splitprefix.data_party.privacy import HiddenPrivacy
from splitprefix.data_party.u_split import check_client_layers, u_split_loss_fn
from splitprefix.evaluation.metrics import next_token_targets
from splitprefix.model.registry import model_dims
from splitprefix.model.split import Activations, Bottom, ClientTop, Head

PrefixGuess = Literal["none", "zeros"]
PREFIX_GUESSES: tuple[PrefixGuess, ...] = ("none", "zeros")
"""How the attacker stands in for the data party's prefix of the top M layers."""
NO_NOISE = GradientNoise()


class _Tap(torch.autograd.Function):
    """Identity whose backward keeps the incoming gradient: what a backward request would carry,
    after every hook the data party put on the returned states (its gradient noise)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sink: list[torch.Tensor]) -> torch.Tensor:
        ctx.sink = sink
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.sink.append(grad.detach().float())
        return grad, None


class RecordingTop(LocalTop):
    """`LocalTop` (head=client) that keeps what the server returns and the gradient it gets back."""

    def __init__(self, model: PreTrainedModel, split_at: int, client_layers: int) -> None:
        super().__init__(model, split_at, "client", client_layers)
        self.seen: list[Activations] = []
        self.grads: list[torch.Tensor] = []

    def forward(self, x: Activations, top_kv: torch.Tensor) -> torch.Tensor:
        out = super().forward(x, top_kv)  # (B, T, d)
        self.seen.append(Activations(out.detach(), x.attention_mask, x.positions))
        return _Tap.apply(out, self.grads) if out.requires_grad else out


@dataclass
class GradientObservation:
    """One row of one head=client training step, as the model party holds it."""

    hidden: torch.Tensor
    """The states it returned (T, d): h_L, or h_{L-M} under the U-split."""
    grad: torch.Tensor
    """The gradient it got back for them (T, d)."""
    attention_mask: torch.Tensor
    """As sent (1, P + T)."""
    positions: torch.Tensor
    """As sent (1, T)."""
    targets: torch.Tensor
    """The truth (T,), -100 where unsupervised: never sent, only scored against."""


def gradient_observations(
    model: PreTrainedModel,
    bottom: Bottom,
    encoded: list[EncodedExample],
    kv: torch.Tensor,
    split_at: int,
    client_layers: int,
    pad_id: int,
    privacy: HiddenPrivacy | None = None,
    grad_noise: GradientNoise = NO_NOISE,
    batch_size: int = 16,
) -> list[GradientObservation]:
    """Run the data party's own training steps (head=client, U-split when M > 0, the gradient noised
    as configured) and keep each row."""
    check_client_layers(split_at, client_layers, model.config.num_hidden_layers)
    top = RecordingTop(model, split_at, client_layers)
    noiser = GradientNoiser(grad_noise) if grad_noise.enabled else None
    loss_fn = u_split_loss_fn(bottom, top, ClientTop(model, client_layers), split_at, privacy, noiser)
    trainable = kv.detach().requires_grad_(True)
    rows: list[GradientObservation] = []
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_id)
        top.seen.clear()
        top.grads.clear()
        loss, count = loss_fn(batch, trainable)
        if not count:
            continue
        loss.backward()
        (x,), (grad,) = top.seen, top.grads
        truth = next_token_targets(batch.labels).to(grad.device)  # scored where the gradients lie
        for b in range(len(truth)):
            rows.append(
                GradientObservation(
                    x.hidden[b].float(),
                    grad[b],
                    x.attention_mask[b : b + 1],
                    x.positions[b : b + 1],
                    truth[b],
                )
            )
    return rows


def best_targets(jacobian: torch.Tensor, probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The v (n,) whose gradient J^T (p - e_v) is most aligned with `grad` (n, d).

    `jacobian` (n, V, d) is d logits / d state at each position, `probs` (n, V) the softmax there."""
    s = torch.einsum("nvd,nv->nd", jacobian, probs)  # J^T p
    along = (grad * s).sum(-1, keepdim=True) - torch.einsum("nvd,nd->nv", jacobian, grad)  # g . c_v
    norm2 = (s * s).sum(-1, keepdim=True) - 2 * torch.einsum("nvd,nd->nv", jacobian, s)
    norm2 = norm2 + (jacobian * jacobian).sum(-1)  # ||c_v||^2
    return (along / norm2.clamp(min=1e-30).sqrt()).argmax(-1)


def head_jacobian(head: Head, hidden: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """d logits / d h (n, V, d) and softmax(logits) (n, V) of the head at each state of `hidden` (n, d)."""

    dtype = next(head.parameters()).dtype  # the head's own dtype; the Jacobian comes back in fp32

    def token_logits(h: torch.Tensor) -> torch.Tensor:
        return head(h[None].to(dtype))[0].float()  # (V,)

    jac = torch.cat([vmap(jacfwd(token_logits))(part) for part in hidden.split(chunk)])
    with torch.no_grad():
        probs = head(hidden.to(dtype)).float().softmax(-1)
    return jac, probs


class TopGuess:
    """The attacker's stand-in for the data party's top M layers: their weights, a guessed prefix."""

    def __init__(self, model: PreTrainedModel, client_layers: int, guess: PrefixGuess) -> None:
        self.top = ClientTop(model, client_layers)
        self.guess = guess
        self.dims = model_dims(model.config)
        self.dtype = model.dtype

    def __call__(self, hidden: torch.Tensor, obs: GradientObservation) -> torch.Tensor:
        """h_L (n, T, d) for `n` copies `hidden` (n, T, d) of a row's h_{L-M}, in the model's dtype."""
        hidden = hidden.to(self.dtype)  # differentiable: the Jacobian reaches the fp32 copies
        n, p = hidden.shape[0], obs.attention_mask.shape[1] - hidden.shape[1]
        mask, positions = obs.attention_mask.expand(n, -1), obs.positions.expand(n, -1)
        if self.guess == "none":
            mask, p = mask[:, p:], 0  # no prefix keys to attend to; positions stay as sent
        d = self.dims
        kv = hidden.new_zeros(self.top.client_layers, 2, d.num_kv_heads, p, d.head_dim)
        return self.top(Activations(hidden, mask, positions), kv)


def local_jacobians(upper: TopGuess, obs: GradientObservation) -> tuple[torch.Tensor, torch.Tensor]:
    """The guessed h_L (T, d) of a row, and E (T, d, d): E[t] = sum_s d h_L,s / d h_t.

    One backward over d copies of the row, copy i with the cotangent e_i at every position."""
    t, d = obs.hidden.shape
    copies = obs.hidden.expand(d, t, d).clone().requires_grad_(True)  # (d, T, d)
    with torch.enable_grad():
        out = upper(copies, obs)  # (d, T, d)
        cotangent = torch.eye(d, dtype=out.dtype, device=out.device)[:, None, :].expand(d, t, d)
        (grad,) = torch.autograd.grad(out, copies, cotangent)  # grad[i, t] = row i of E[t]
    return out[0].detach(), grad.transpose(0, 1)


def invert_row(head: Head, upper: TopGuess | None, obs: GradientObservation) -> torch.Tensor:
    """The attacker's guess of the target (N,) at each supervised position of one row.

    Guesses are made position by position, so scoring them at the supervised positions only gives
    the rate the attacker would get running it everywhere."""
    at = obs.targets != IGNORE_INDEX
    if upper is None:  # head=client: the gradient is dL/dh_L of the model party's own h_L
        jac, probs = head_jacobian(head, obs.hidden[at])
    else:
        last, local = local_jacobians(upper, obs)
        jac, probs = head_jacobian(head, last[at])
        jac = jac @ local[at]  # (N, V, d) through the guessed top layers
    return best_targets(jac, probs, obs.grad[at])


def prompt_end_leak(rows: list[GradientObservation]) -> dict[str, float]:
    """How well "zero gradient = no loss here" separates the prompt from the completion.

    `supervision_found`: share of real positions whose supervised-or-not the attacker reads right;
    `prompt_end_found`: share of rows whose first nonzero-gradient position is the first supervised one."""
    right = total = ends = 0
    for r in rows:
        real = r.attention_mask[0, r.attention_mask.shape[1] - len(r.targets) :].bool()
        seen = r.grad.abs().amax(-1) > 0
        truth = r.targets != IGNORE_INDEX
        right += int((seen == truth)[real].sum())
        total += int(real.sum())
        ends += int(bool(truth.any()) and int(seen.int().argmax()) == int(truth.int().argmax()))
    return {"supervision_found": right / max(total, 1), "prompt_end_found": ends / max(len(rows), 1)}


def gradient_label_recovery(
    model: PreTrainedModel,
    bottom: Bottom,
    encoded: list[EncodedExample],
    kv: torch.Tensor,
    split_at: int,
    pad_id: int,
    client_layers: int = 0,
    privacy: HiddenPrivacy | None = None,
    grad_noise: GradientNoise = NO_NOISE,
) -> dict[str, object]:
    """Share of supervised targets the model party inverts from the gradients of head=client steps
    (M = 0) or U-split steps (M > 0; its best prefix guess), with what zero gradients tell it."""
    rows = gradient_observations(
        model, bottom, encoded, kv, split_at, client_layers, pad_id, privacy, grad_noise
    )
    head = Head(model)
    guesses: tuple[PrefixGuess | None, ...] = PREFIX_GUESSES if client_layers else (None,)
    rates: dict[str, float] = {}
    total = sum(int((r.targets != IGNORE_INDEX).sum()) for r in rows)
    for guess in guesses:
        upper = None if guess is None else TopGuess(model, client_layers, guess)
        hits = 0
        for r in rows:
            if bool((r.targets != IGNORE_INDEX).any()):
                hits += int((invert_row(head, upper, r) == r.targets[r.targets != IGNORE_INDEX]).sum())
        rates[guess or "exact"] = hits / max(total, 1)
    return {
        "client_layers": client_layers,
        "grad_noise": grad_noise.multiplier,
        "recovery": max(rates.values()),
        "by_prefix_guess": rates,
        "n_targets": total,
        **prompt_end_leak(rows),
    }

"""What each head mode reveals to the model party, stated once for `/v1/info`, the logs and the docs.

The texts are part of the protocol: the server lists them in `/v1/info` (`head_disclosure`, and
`warnings` for the modes it offers), logs them when it starts, and the data party logs the one of
its mode when it opens a split session.
"""

from __future__ import annotations

from typing import Literal

HEAD_SERVER_DISCLOSURE = (
    "head=server: the data party sends its target tokens to the model party in the clear, and the model "
    "party computes the loss from them: it learns every label. Use it only for labels that need not be "
    "private from the model party; head=client keeps them off the wire."
)
HEAD_CLIENT_DISCLOSURE = (
    "head=client: the target tokens never cross the wire, but they are not hidden from the model party. "
    "It computed the last hidden states h_L itself and owns the final norm and LM head the data party "
    "applies, so it can invert the gradient dL/dh_L sent back at every position through them "
    "(softmax - onehot(target)) and recover each target token; positions with a zero gradient show "
    "where the prompt ends. It keeps labels from whoever sees only the wire, not from the model party. "
    "Keeping the top layers at the data party (client_layers M > 0, the U-shaped split) hides where the "
    "prompt ends but, measured, still lets 93-100% of the targets through; noise on the gradient sent "
    "back (grad_noise) is what lowers that, at a cost in learning (docs/privacy/audit.md, Labels)."
)
HEAD_DISCLOSURE: dict[Literal["server", "client"], str] = {
    "server": HEAD_SERVER_DISCLOSURE,
    "client": HEAD_CLIENT_DISCLOSURE,
}
"""Head mode -> what it reveals to the model party about the data party's targets."""


def disclosures(modes: list[Literal["server", "client"]]) -> dict[Literal["server", "client"], str]:
    """The disclosure of each of `modes`, in their order."""
    return {mode: HEAD_DISCLOSURE[mode] for mode in modes}

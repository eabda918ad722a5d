"""The privacy audit: the model party, played as a curious attacker against what crosses the wire.

What the attacker knows: the full model's weights (embeddings and the bottom K layers included),
the tokenizer, and every message of the protocol (`wire.schemas`): the layer-K hidden states, the
attention mask (so P and the padding), the positions, the prefix for its own layers, with
head=server the target tokens, and with head=client the gradient sent back, from which it inverts
them. It does not know the data party's prefix for layers [0, K) (nor, under the U-shaped split,
for the top M layers), or its text. It knows the privacy mechanism and its settings (C and sigma),
but not the noise, which is fresh from the OS.
"""

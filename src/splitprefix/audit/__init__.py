"""The privacy audit: the model party, played as a curious attacker against what crosses the wire.

What the attacker knows: the full model's weights (embeddings and the bottom K layers included),
the tokenizer, and every message of the protocol (`wire.schemas`): the layer-K hidden states, the
attention mask (so P and the padding), the positions, the prefix for its own layers, and with
head=server the supervised positions and the logit gradients. It does not know the data party's
prefix for layers [0, K), its text, or (with head=client) its labels. It knows the privacy
mechanism and its settings (C and sigma), but not the noise's seed.
"""

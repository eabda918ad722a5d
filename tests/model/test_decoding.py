"""The shared decoding loop: EOS padding, early stop and no forward after the last token."""

from __future__ import annotations

import torch

from splitprefix.model.decoding import decode

PAD, EOS = 0, 2


def scripted(rows: list[list[int]]):
    """A model that answers row i's j-th token from `rows`, counting how often it is advanced."""
    calls = []

    def advance(token: torch.Tensor) -> int:
        calls.append(token.clone())
        return len(calls)

    def choose(step: int) -> torch.Tensor:
        return torch.tensor([r[step] for r in rows])

    return advance, choose, calls


def test_rows_past_eos_are_padded_and_the_loop_stops_when_all_have_ended():
    # Prepare
    advance, choose, calls = scripted([[5, EOS, 7, 7], [6, 6, EOS, 7]])
    # Execute
    tokens = torch.stack(list(decode(0, advance, choose, 4, PAD, torch.tensor([EOS]))), dim=1)
    # Assert
    assert tokens.tolist() == [[5, EOS, PAD], [6, 6, EOS]]
    assert len(calls) == 2  # no forward once every row has ended


def test_without_eos_ids_it_runs_to_the_budget_and_skips_the_last_forward():
    # Prepare
    advance, choose, calls = scripted([[EOS, EOS, EOS]])
    # Execute
    tokens = list(decode(0, advance, choose, 3, PAD, None))
    # Assert
    assert [int(t) for t in tokens] == [EOS, EOS, EOS]
    assert len(calls) == 2

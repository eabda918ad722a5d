"""Bearer tokens per data party, from a JSON or a lines tokens file."""

from __future__ import annotations

import logging

import pytest

from splitprefix.errors import ConfigError
from splitprefix.model_party.auth import ANONYMOUS, TokenAuth, Unauthorized, read_tokens_file

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abcd"


def test_a_json_tokens_file_maps_parties_to_tokens(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(f'{{"alice": "{ALICE}", "bob": "{BOB}"}}')
    assert read_tokens_file(path) == {"alice": ALICE, "bob": BOB}


def test_a_lines_tokens_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(f"# party token\n\nalice {ALICE}\n  bob   {BOB}  # the bank\n")
    assert read_tokens_file(path) == {"alice": ALICE, "bob": BOB}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"alice": ', "not valid JSON"),
        ('{"alice": 5}', "map party names to token strings"),
        ("{}", "lists no parties"),
        ("", "lists no parties"),
        (f"alice {ALICE} extra", r"tokens.txt:1: expected 'party-name token'; got 3 fields"),
        (f"alice {ALICE}\nalice {BOB}", r"tokens.txt:2: party 'alice' is listed twice"),
        (f"alice {ALICE}\nbob {ALICE}", "the same token"),
    ],
)
def test_a_bad_tokens_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_tokens_file(path)


def test_short_tokens_get_a_warning(tmp_path, caplog):
    path = tmp_path / "tokens.txt"
    path.write_text("alice abc\n")
    with caplog.at_level(logging.WARNING):
        read_tokens_file(path)
    assert "shorter than 16 characters" in caplog.text


def test_each_token_names_its_party():
    auth = TokenAuth({"alice": ALICE, "bob": BOB})
    assert auth.client_id(f"Bearer {ALICE}") == "alice"
    assert auth.client_id(f"bearer {BOB}") == "bob"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "needs a bearer token"),
        ("", "needs a bearer token"),
        (f"Basic {ALICE}", "must be 'Bearer <token>'"),
        ("Bearer ", "must be 'Bearer <token>'"),
        ("Bearer wrong-token-0123456789", "not valid"),
        (f"Bearer {ALICE}x", "not valid"),
    ],
)
def test_a_missing_or_wrong_token_is_refused(header, message):
    with pytest.raises(Unauthorized, match=message):
        TokenAuth({"alice": ALICE}).client_id(header)


def test_without_tokens_every_request_is_anonymous():
    auth = TokenAuth.from_file(None)
    assert not auth.enabled
    assert auth.client_id(None) == ANONYMOUS
    assert auth.client_id("Bearer anything") == ANONYMOUS

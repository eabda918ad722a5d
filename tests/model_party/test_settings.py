"""Server settings: conflicts and out-of-range values are refused with the offending values."""

from __future__ import annotations

import pytest

from splitprefix.errors import ConfigError
from splitprefix.model_party.settings import ServerSettings


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"split_at": 0}, r"1 <= K < L .* got K=0"),
        ({"head": "middle"}, "head must be 'server', 'client' or 'both'; got 'middle'"),
        ({"port": 70000}, r"port must be in \[0, 65535\]; got 70000"),
        ({"dtype": "fp64"}, "dtype must be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1; got 0"),
        ({"max_request_bytes": -1}, "max_request_bytes must be >= 1"),
        ({"graph_ttl_s": 0}, "graph_ttl_s > 0"),
        ({"tokens_file": "missing.json"}, "tokens_file missing.json does not exist"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        ServerSettings(**({"model_dir": "builtin", "split_at": 2} | changes))


def test_a_certificate_needs_its_key(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("pem")
    with pytest.raises(ConfigError, match="give both tls_cert and tls_key"):
        ServerSettings("builtin", 2, tls_cert=cert)


@pytest.mark.parametrize(
    ("head", "modes"), [("client", ["client"]), ("server", ["server"]), ("both", ["server", "client"])]
)
def test_head_setting_gives_the_offered_modes(head, modes):
    assert ServerSettings("builtin", 2, head=head).head_modes == modes

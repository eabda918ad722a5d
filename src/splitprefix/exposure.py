"""Whether a service may listen where others can reach it: never open by accident.

A service bound to a loopback address is reachable from this machine only. Bound anywhere else
without credentials, anyone on the network could use it (the model party's compute, or the data
party's prefix and text through the gateway), so both `serve` and `gateway` refuse to start that
way unless the operator says `--insecure` on purpose.
"""

from __future__ import annotations

import ipaddress
import logging

from splitprefix.errors import ConfigError

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: 'localhost' or an address in 127.0.0.0/8 or ::1."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def check_exposure(host: str, has_credentials: bool, insecure: bool, service: str, credentials: str) -> None:
    """Refuse (ConfigError) an open bind: `host` is not loopback and no credentials are set.

    `credentials` names the option that sets them (e.g. '--tokens-file'). With `insecure` the
    bind is allowed, and a warning says so.
    """
    if has_credentials or is_loopback(host):
        return
    if insecure:
        logger.warning(
            "%s listens on %s without credentials (--insecure): anyone who can reach it can use it",
            service,
            host,
        )
        return
    raise ConfigError(
        f"{service} would listen on {host} without credentials, so anyone who can reach it could use it. "
        f"Give {credentials}, or bind to 127.0.0.1, or pass --insecure to run it open on purpose"
    )

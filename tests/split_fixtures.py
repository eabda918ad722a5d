"""Fixtures shared by the split-training tests (loaded by tests/conftest.py): a tiny model, its
emulator, and a real server for it on loopback, one of each per test module."""

from __future__ import annotations

import pytest

from live_server import LiveServer
from split_helpers import make_dirs, server_settings
from splitprefix.model_party.app import create_app


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(dirs):
    with LiveServer(create_app(server_settings(dirs))) as live:
        yield live

"""The two-node fixture: two network namespaces joined by a 1 Gbit/s token-bucket veth link (see
netns.py), one "node" each, removed after the tests (also when they fail). Skips with the reason
where this machine lacks the rights or tools to build it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import TwoNodeNetwork, Unavailable, missing_requirement  # noqa: E402

LINK_RATE = "1gbit"


@pytest.fixture(scope="session")
def two_nodes():
    reason = missing_requirement()
    if reason:
        pytest.skip(f"two-node network unavailable: {reason}")
    try:
        network = TwoNodeNetwork(LINK_RATE)
    except Unavailable as error:
        pytest.skip(f"two-node network unavailable: {error}")
    try:
        yield network
    finally:
        network.close()

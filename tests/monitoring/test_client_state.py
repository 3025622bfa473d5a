"""Signed clientStates: what they vouch for, and that nothing else passes."""

from __future__ import annotations

import os

import pytest

from mailsync.errors import ConfigurationError
from mailsync.monitoring.client_state import ClientStates, SignedState
from mailsync.monitoring.records import SubscriptionKind

ACCOUNT = "0123456789abcdef0123456789abcdef"


def test_a_signed_state_names_its_account_and_kind_and_fits_graphs_limit() -> None:
    states = ClientStates([("k1", os.urandom(32))])
    for kind in SubscriptionKind:
        state = states.new(ACCOUNT, kind)
        assert len(state) <= 128 and ClientStates.is_signed(state)
        assert states.verify(state) == SignedState(ACCOUNT, kind)
    assert states.new(ACCOUNT, SubscriptionKind.MESSAGES) != states.new(ACCOUNT, SubscriptionKind.MESSAGES)


def test_anything_but_a_genuine_state_is_refused() -> None:
    states = ClientStates([("k1", os.urandom(32))])
    other = ClientStates([("k1", os.urandom(32))])     # same key id, another deployment's key
    genuine = states.new(ACCOUNT, SubscriptionKind.MESSAGES)
    head, mac = genuine.rsplit(".", 1)
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    forged = [
        other.new(ACCOUNT, SubscriptionKind.MESSAGES),
        f"{head}.{flipped}",
        genuine.replace(".m.", ".f.", 1),                      # the kind changed: the MAC covers it
        genuine.replace(ACCOUNT, "f" * 32, 1),                 # another account under the same MAC
        genuine.replace(".k1.", ".k2.", 1),                    # a key id we do not have
        f"{head}.",
        head,
        genuine + ".x",
        "v1." + "é" * 20,
        "",
    ]
    for state in forged:
        assert states.verify(state) is None, state


def test_keys_rotate_like_the_sealed_tokens() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = ClientStates([("old", old_key)])
    after = ClientStates([("new", new_key), ("old", old_key)])
    dropped = ClientStates([("new", new_key)])
    state = before.new(ACCOUNT, SubscriptionKind.FOLDERS)
    assert after.verify(state) == SignedState(ACCOUNT, SubscriptionKind.FOLDERS)
    assert dropped.verify(state) is None
    assert ".new." in after.new(ACCOUNT, SubscriptionKind.MESSAGES)
    with pytest.raises(ConfigurationError):
        ClientStates([])

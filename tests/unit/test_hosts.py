"""Ownership of servers among collector hosts: rendezvous hashing."""

from __future__ import annotations

from collector import hosts

SERVERS = list(range(1, 61))


def test_every_server_has_exactly_one_owner_and_all_agree() -> None:
    live = ["alpha", "beta", "gamma"]
    share = hosts.shares(SERVERS, live)
    assert sorted(s for servers in share.values() for s in servers) == SERVERS
    # any order of the same view gives the same owners
    assert hosts.shares(SERVERS, list(reversed(live))) == share
    for host in live:
        assert hosts.owned(SERVERS, live, host) == share[host]


def test_three_hosts_share_sixty_servers_evenly() -> None:
    share = hosts.shares(SERVERS, ["alpha", "beta", "gamma"])
    for servers in share.values():
        # within 30 % of a third
        assert 14 <= len(servers) <= 26, {h: len(s) for h, s in share.items()}


def test_a_fourth_host_takes_about_a_quarter_and_nothing_else_moves() -> None:
    before = hosts.shares(SERVERS, ["alpha", "beta", "gamma"])
    after = hosts.shares(SERVERS, ["alpha", "beta", "gamma", "delta"])
    moved = [s for s in SERVERS if hosts.owner(s, ["alpha", "beta", "gamma"])
             != hosts.owner(s, ["alpha", "beta", "gamma", "delta"])]
    assert set(moved) == set(after["delta"])
    assert 8 <= len(moved) <= 22
    for host in ("alpha", "beta", "gamma"):
        assert set(after[host]) <= set(before[host])


def test_a_host_leaving_moves_only_its_own_servers() -> None:
    before = hosts.shares(SERVERS, ["alpha", "beta", "gamma"])
    after = hosts.shares(SERVERS, ["alpha", "gamma"])
    assert set(before["alpha"]) <= set(after["alpha"])
    assert set(before["gamma"]) <= set(after["gamma"])
    assert set(after["alpha"]) | set(after["gamma"]) == set(SERVERS)


def test_a_host_alone_owns_everything_and_counts_itself_live() -> None:
    assert hosts.owned(SERVERS, [], "solo") == SERVERS
    assert hosts.owner(5, []) is None


def test_lease_session_names_round_trip() -> None:
    name = "powa-fleet " + hosts.lease_purpose("db-collector-2")
    assert hosts.lease_holder(name) == "db-collector-2"
    assert hosts.lease_holder("powa-fleet worker 3") is None

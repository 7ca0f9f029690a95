"""The routing policies as pure functions: consistent hashing, bounded loads, prefix affinity."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pagoda.router.policies import (
    BLOCK_CHARS,
    Decision,
    LeastLoad,
    PrefixAffinity,
    Ring,
    RoundRobin,
    load_bound,
    pick_bounded,
    prefix_blocks,
    render_prompt,
    stable_hash,
)

BACKENDS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]


def chat(*contents: str, system: str | None = None) -> dict[str, object]:
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return {"model": "m", "messages": messages}


def test_blocks_are_chained_and_shared_prefixes_share_blocks() -> None:
    text = "x" * (3 * BLOCK_CHARS) + "tail"
    blocks = prefix_blocks(text)
    assert len(blocks) == 3  # the partial tail is left out, as the engine's cache leaves it out
    assert prefix_blocks(text[: 2 * BLOCK_CHARS]) == blocks[:2]
    changed = "y" + text[1:]
    assert all(a != b for a, b in zip(prefix_blocks(changed), blocks))  # one char changes every block
    assert prefix_blocks(text, model="other") != blocks


def test_a_conversation_keeps_its_home_while_it_grows() -> None:
    first = chat("hello, how do I bake bread?")
    later = chat("hello, how do I bake bread?", "With flour.", "and then?")
    assert render_prompt(later)[0].startswith(render_prompt(first)[0])
    assert render_prompt(later)[1] == render_prompt(first)[1]
    # a long system prompt is the home of all its users (a tenant); a short one is not
    tenant = "You are the support bot of ACME. " * 4
    assert render_prompt(chat("a", system=tenant))[1] == render_prompt(chat("b", system=tenant))[1]
    assert render_prompt(chat("a", system="Be brief."))[1] != render_prompt(chat("b", system="Be brief."))[1]
    # content parts render like the plain string
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert render_prompt(parts) == render_prompt({"messages": [{"role": "user", "content": "hi"}]})
    assert render_prompt({"prompt": ["abc"]}) == render_prompt({"prompt": "abc"})


def test_the_ring_moves_only_the_keys_of_a_removed_backend() -> None:
    full, reduced = Ring.build(BACKENDS), Ring.build(BACKENDS[:-1])
    keys = [stable_hash(str(i).encode()) for i in range(4000)]
    before = {k: full.walk(k)[0] for k in keys}
    after = {k: reduced.walk(k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == BACKENDS[-1] for k in moved)
    share = Counter(before.values())
    assert min(share.values()) > 0.15 * len(keys)  # virtual nodes spread keys roughly evenly


def test_bounded_loads_cap_every_backend() -> None:
    ring = Ring.build(BACKENDS)
    loads = dict.fromkeys(BACKENDS, 0.0)
    hot = stable_hash(b"one very popular prefix")
    for _ in range(100):  # every request has the same key: without a bound, one backend takes all
        backend, _ = pick_bounded(ring, hot, loads, 1.25)
        loads[backend] += 1
    assert max(loads.values()) == 32  # ceil(1.25 * 100 / 4): the bound, counting each new request
    assert loads[ring.walk(hot)[0]] == 32 and min(loads.values()) > 0  # the home fills first, then spills
    assert load_bound(dict.fromkeys(BACKENDS, 0.0), 1.25) == 1
    # below the bound the home is kept
    idle = dict.fromkeys(BACKENDS, 0.0)
    assert pick_bounded(ring, hot, idle, 1.25) == (ring.walk(hot)[0], False)


def test_prefix_policy_follows_conversations_and_spills_under_load() -> None:
    policy = PrefixAffinity()
    idle = dict.fromkeys(BACKENDS, 0.0)
    conversation = ["Please summarise the following text for me: " + "lorem ipsum " * 10]
    first = policy.choose(chat(*conversation), idle)
    assert first.reason == "prefix-hash"
    conversation += ["Sure.", "Now shorter."]
    second = policy.choose(chat(*conversation), idle)
    assert (second.backend, second.reason) == (first.backend, "prefix-hit")
    busy = {**idle, first.backend: 10.0}
    spilled = policy.choose(chat(*conversation), busy)
    assert spilled.backend != first.backend and spilled.reason == "prefix-spill"
    # no prompt (/v1/models): least-load
    assert policy.choose(None, {**idle, BACKENDS[0]: 3}).reason == "least-load"


def test_a_nearly_full_kv_cache_turns_a_prefix_away() -> None:
    """Equal loads; only the engines' KV-cache usage differs. Two routers with the same history decide
    differently because one sees the conversation's replica nearly full."""
    calm, wary = PrefixAffinity(), PrefixAffinity()
    idle = dict.fromkeys(BACKENDS, 0.0)
    conversation = ["Translate this into French, please: " + "the cat sat on the mat " * 8]
    owner = calm.choose(chat(*conversation), idle).backend
    assert wary.choose(chat(*conversation), idle).backend == owner
    conversation += ["Le chat...", "And into German?"]
    assert calm.choose(chat(*conversation), idle) == Decision(owner, "prefix-hit")
    moved = wary.choose(chat(*conversation), idle, full={owner})
    assert moved.backend != owner and moved.reason == "prefix-spill"
    # it goes where the ring goes next, so every router replica moves it to the same place
    home = stable_hash(("m\0" + render_prompt(chat(*conversation))[1]).encode())
    assert moved.backend == Ring.build(BACKENDS).walk(home)[1]
    # the next turn follows it there, even once the old replica has room again
    conversation += ["Die Katze...", "Thanks!"]
    assert wary.choose(chat(*conversation), idle) == Decision(moved.backend, "prefix-hit")
    # a full replica elsewhere changes nothing; all of them full is the same as none
    others = set(BACKENDS) - {owner}
    assert calm.choose(chat(*conversation), idle, full=others) == Decision(owner, "prefix-hit")
    assert calm.choose(chat(*conversation), idle, full=set(BACKENDS)) == Decision(owner, "prefix-hit")


def test_bounded_loads_prefer_a_replica_with_room_in_its_kv_cache() -> None:
    ring = Ring.build(BACKENDS)
    key = stable_hash(b"a tenant's system prompt")
    first, second, third, _ = ring.walk(key)
    idle = dict.fromkeys(BACKENDS, 0.0)
    assert pick_bounded(ring, key, idle, 1.25, full={first}) == (second, True)
    # over the bound beats nearly full: the next one under the bound with room
    loads = {**idle, second: 3.0}
    assert pick_bounded(ring, key, loads, 1.25, full={first}) == (third, True)
    # nearly full beats over the bound when nothing under the bound has room
    assert pick_bounded(ring, key, loads, 1.25, full=set(BACKENDS) - {second}) == (first, False)


def test_router_replicas_agree_without_sharing_state() -> None:
    one, two = PrefixAffinity(), PrefixAffinity()
    idle = dict.fromkeys(BACKENDS, 0.0)
    rng = random.Random(0)
    bodies = [chat(f"session {rng.random()}: question") for _ in range(50)]
    assert [one.choose(b, idle).backend for b in bodies] == [two.choose(b, idle).backend for b in bodies]
    assert len({one.choose(b, idle).backend for b in bodies}) == len(BACKENDS)  # and they spread


def test_baselines() -> None:
    rr = RoundRobin()
    assert [rr.choose(None, dict.fromkeys(BACKENDS, 0)).backend for _ in range(8)] == sorted(BACKENDS)[1:] + \
        sorted(BACKENDS)[:1] + sorted(BACKENDS)[1:] + sorted(BACKENDS)[:1]
    loads = {BACKENDS[0]: 2.0, BACKENDS[1]: 0.0, BACKENDS[2]: 5.0, BACKENDS[3]: 0.0}
    least = LeastLoad()
    assert {least.choose(None, loads).backend for _ in range(4)} == {BACKENDS[1], BACKENDS[3]}


def test_the_cli_needs_backends_or_discovery(capsys) -> None:  # type: ignore[no-untyped-def]
    from pagoda.cli import main

    assert main(["router"]) == 2
    assert "--backend URL or --discovery-service" in capsys.readouterr().out
    assert main(["router", "--backend", "http://x:1", "--load-factor", "0.5"]) == 2


@pytest.mark.parametrize(
    "flag", [("--hold-timeout", "nan"), ("--hold-timeout", "inf"), ("--load-factor", "nan"),
             ("--health-interval", "0"), ("--max-retries", "-1"), ("--max-pending", "-1")]
)
def test_the_cli_refuses_values_that_would_reach_requests_broken(flag: tuple[str, str]) -> None:
    from pagoda.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(["router", "--backend", "http://x:1", *flag])
    assert exit_info.value.code == 2

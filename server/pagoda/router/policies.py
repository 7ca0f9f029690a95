"""Routing policies: filter (done by the pool: ready, not ejected) -> score -> pick.

Everything a decision depends on is either in the request, in the backend set, or in the load numbers, so
router replicas that see the same requests make the same choices without sharing state. The one piece of
per-replica state, the prefix index, only remembers where this replica sent earlier prompts; a replica that
never saw a conversation falls back to the same consistent-hash choice every other replica makes.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

BLOCK_CHARS = 64  # ~16 tokens, the engine's block size: a routed prompt's blocks match the next turn's
MAX_BLOCKS = 256  # look at most ~16k characters into a prompt
HOME_CHARS = 256  # a completion prompt's head that picks its home on the ring
VIRTUAL_NODES = 128  # ring points per backend: keeps the key share of each backend within a few percent


def stable_hash(data: bytes) -> int:
    """64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _utf8(text: str) -> bytes:
    # a lone surrogate ("\\ud800" in the JSON) is for the engine to reject with its 400: hash it as is
    return text.encode("utf-8", "surrogatepass")


def _json_text(value: object) -> str:
    """A deterministic string for a non-text prompt (token ids, a batch). Nesting too deep to render is no
    valid prompt: route it anywhere, the engine answers it with its 400."""
    try:
        return json.dumps(value, sort_keys=True)
    except RecursionError:
        return ""


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones, in order
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return "".join(text for text in texts if isinstance(text, str))
    return "" if content is None else _json_text(content)


def _render_message(message: Mapping[str, object]) -> str:
    return f"<|{message.get('role', '')}|>{_content_text(message.get('content'))}\n"


def render_prompt(body: Mapping[str, object]) -> tuple[str, str]:
    """(prompt, home): the prompt as a deterministic string, and the head of it that names its home.

    Not the engine's chat template (the router has no tokenizer); only the prefix structure matters, and
    this keeps it: requests whose messages share a prefix render to strings sharing a prefix. The home
    stays the same for every turn of a conversation: a system prompt worth caching (a block or longer,
    e.g. a tenant's) on its own, so its users share a replica; else the opening up to the first user
    message, so conversations spread.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        rendered = [_render_message(m) for m in messages if isinstance(m, dict)]
        roles = [m.get("role") for m in messages if isinstance(m, dict)]
        system = sum(1 for _ in itertools.takewhile(lambda r: r in ("system", "developer"), roles))
        head = "".join(rendered[:system])
        home = head if len(head) >= BLOCK_CHARS else "".join(rendered[: system + 1])
        return "".join(rendered), home
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one is the common case of the list form
    if not isinstance(prompt, str):
        prompt = "" if prompt is None else _json_text(prompt)
    return prompt, prompt[:HOME_CHARS]


def prefix_blocks(
    text: str, model: str = "", block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
) -> list[int]:
    """Chained hashes of the text's full blocks, like the engine's block hashes: block i's hash covers
    everything up to its end, so equal hashes mean equal prefixes. A partial tail is left out, as the
    engine leaves it out of its cache: the next turn's blocks would never match it."""
    hashes: list[int] = []
    parent = stable_hash(_utf8(model))
    for start in range(0, min(len(text) // block_chars, max_blocks) * block_chars, block_chars):
        chunk = _utf8(text[start : start + block_chars])
        parent = stable_hash(parent.to_bytes(8, "big") + chunk)
        hashes.append(parent)
    return hashes


@dataclass(frozen=True)
class Ring:
    """A consistent-hash ring over backend names: adding or removing one moves only its own keys."""

    points: tuple[int, ...]
    owners: tuple[str, ...]
    size: int = 0  # distinct backends

    @classmethod
    def build(cls, backends: Sequence[str], virtual_nodes: int = VIRTUAL_NODES) -> Ring:
        pairs = sorted(
            (stable_hash(f"{backend}#{i}".encode()), backend)
            for backend in backends
            for i in range(virtual_nodes)
        )
        return cls(tuple(p for p, _ in pairs), tuple(b for _, b in pairs), len(set(backends)))

    def walk(self, key: int) -> list[str]:
        """Distinct backends in ring order starting at the key's position."""
        seen: dict[str, None] = {}
        start = bisect.bisect_left(self.points, key)
        for i in range(len(self.owners)):
            seen.setdefault(self.owners[(start + i) % len(self.owners)], None)
            if len(seen) == self.size:
                break
        return list(seen)


def load_bound(loads: Mapping[str, float], factor: float) -> float:
    """Consistent hashing with bounded loads (Mirrokni et al.): no backend takes more than `factor` times
    the average load, counting the request being placed."""
    return math.ceil(factor * (sum(loads.values()) + 1) / max(len(loads), 1))


def pick_bounded(
    ring: Ring, key: int, loads: Mapping[str, float], factor: float, full: AbstractSet[str] = frozenset()
) -> tuple[str, bool]:
    """The first backend on the ring from `key` whose load is under the bound, passing over those whose KV
    cache is nearly full (`full`) while another is under the bound; (backend, spilled)."""
    order = [b for b in ring.walk(key) if b in loads]
    bound = load_bound(loads, factor)
    under = [b for b in order if loads[b] + 1 <= bound]  # never empty with factor >= 1
    roomy = [b for b in under if b not in full]
    backend = (roomy or under or sorted(order, key=lambda b: loads[b]))[0]
    return backend, backend != order[0]


def pick_least_load(loads: Mapping[str, float], turn: int) -> str:
    """The least-loaded backend; ties rotate with `turn` so equal backends share the work."""
    names = sorted(loads)
    lowest = min(loads.values())
    tied = [b for b in names if loads[b] == lowest]
    return tied[turn % len(tied)]


def pick_round_robin(backends: Sequence[str], turn: int) -> str:
    return sorted(backends)[turn % len(backends)]


@dataclass
class PrefixIndex:
    """Approximate map prefix block -> backend it was last routed to, rebuilt from this replica's traffic.

    LRU-bounded, so memory stays flat; a wrong guess costs one cache miss, never correctness.
    """

    capacity: int = 200_000
    _entries: OrderedDict[int, str] = field(default_factory=OrderedDict)

    def longest_match(self, blocks: Sequence[int], eligible: Mapping[str, object]) -> tuple[str | None, int]:
        """The backend holding the longest routed prefix of `blocks` among `eligible`, and its length."""
        for length in range(len(blocks), 0, -1):
            backend = self._entries.get(blocks[length - 1])
            if backend is not None and backend in eligible:
                return backend, length
        return None, 0

    def record(self, blocks: Sequence[int], backend: str) -> None:
        for block in blocks:
            self._entries[block] = backend
            self._entries.move_to_end(block)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class Decision:
    backend: str
    reason: str  # the metric label: round-robin, least-load, prefix-hit, prefix-hash, prefix-spill


class Policy:
    def choose(
        self,
        body: Mapping[str, object] | None,
        loads: Mapping[str, float],
        full: AbstractSet[str] = frozenset(),
    ) -> Decision:
        """`loads`: each eligible backend's open + waiting requests; `full`: those whose KV cache is nearly
        full (the engine would queue or preempt a new request there)."""
        raise NotImplementedError


class RoundRobin(Policy):
    """What a Kubernetes Service does; the baseline."""

    def __init__(self) -> None:
        self.turn = 0

    def choose(
        self,
        body: Mapping[str, object] | None,
        loads: Mapping[str, float],
        full: AbstractSet[str] = frozenset(),
    ) -> Decision:
        self.turn += 1
        return Decision(pick_round_robin(list(loads), self.turn), "round-robin")


class LeastLoad(Policy):
    def __init__(self) -> None:
        self.turn = 0

    def choose(
        self,
        body: Mapping[str, object] | None,
        loads: Mapping[str, float],
        full: AbstractSet[str] = frozenset(),
    ) -> Decision:
        self.turn += 1
        return Decision(pick_least_load(loads, self.turn), "least-load")


class PrefixAffinity(Policy):
    """Longest routed prefix first, else consistent hashing of the prompt's home; loads bounded either way,
    and a replica whose KV cache is nearly full passed over while another has room (a prefix hit is worth
    less than a wait for blocks or a preemption; llm-d's kv-cache-utilization scorer weighs the same).

    The home (see render_prompt) is the same for every turn of a conversation and for every user of a
    tenant's system prompt, so router replicas agree on it without talking; a later turn extends a prefix
    the index already maps, so it follows its conversation even after a spill. A request with no prompt
    (/v1/models) goes least-load.
    """

    def __init__(self, load_factor: float = 1.25) -> None:
        self.load_factor = load_factor
        self.index = PrefixIndex()
        self.fallback = LeastLoad()
        self._ring = Ring((), ())
        self._ring_members: frozenset[str] = frozenset()

    def ring(self, backends: Sequence[str]) -> Ring:
        members = frozenset(backends)
        if members != self._ring_members:
            self._ring, self._ring_members = Ring.build(sorted(members)), members
        return self._ring

    def choose(
        self,
        body: Mapping[str, object] | None,
        loads: Mapping[str, float],
        full: AbstractSet[str] = frozenset(),
    ) -> Decision:
        text, home = render_prompt(body) if body else ("", "")
        if not text:
            return self.fallback.choose(body, loads)
        model = body.get("model") if body else None
        model = model if isinstance(model, str) else ""
        blocks = prefix_blocks(text, model)
        if loads.keys() <= full:  # all nearly full: moving a prompt off its cache gains nothing
            full = frozenset()
        bound = load_bound(loads, self.load_factor)
        owner, _ = self.index.longest_match(blocks, loads)
        if owner is not None and loads[owner] + 1 <= bound and owner not in full:
            decision = Decision(owner, "prefix-hit")
        else:
            key = stable_hash(_utf8(f"{model}\0{home}"))
            backend, spilled = pick_bounded(self.ring(list(loads)), key, loads, self.load_factor, full)
            decision = Decision(backend, "prefix-spill" if spilled else "prefix-hash")
        self.index.record(blocks, decision.backend)
        return decision


POLICIES = {"prefix": PrefixAffinity, "least-load": LeastLoad, "round-robin": RoundRobin}

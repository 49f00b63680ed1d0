"""The side-effect ledger a pipeline reaches through `RunContext.effects` (Cairn's TaskDedup).

A record is stored exactly once by the sink; a side effect that is not a record (a call to an
external system: send an e-mail, post to a webhook, charge a card) is not, because a batch is
re-run after a crash or a retry. The ledger gives each such effect a fingerprint (`key`, scoped
to the job or to the tenant) and remembers which ones were done, so a re-run skips them:

    result = context.effects.once(f"notify:{order_id}", lambda: client.notify(order_id))

    with context.effects.guard(f"charge:{order_id}") as effect:
        if not effect.skip:
            # pass effect.fingerprint as the external system's idempotency key, if it has one
            effect.result = client.charge(order_id, idempotency_key=effect.fingerprint)

Semantics, exactly (`mode`):

- `at_least_once` (default): the call is made until one run of it returns and is recorded as
  done; after that, never again (for this key and scope). A crash (or a lost lease) after the
  external system acted but before the ledger recorded it makes the next run call it again: the
  external system may see the call twice, so give it `effect.fingerprint` as an idempotency key
  when it takes one. A call that raises is recorded as not done (the retry calls it again). While
  another live run holds the effect, `EffectBusy` (retryable) is raised: the shard is retried.
- `at_most_once`: the ledger records the attempt *before* the call; an effect whose attempt is
  recorded is never called again, whatever happened to it: a crash during the call or a call
  that raised leaves it "in doubt" and a re-run skips it (`effect.skip` and `effect.in_doubt`
  are true, `once` returns None). The external system sees the call once or not at all.

`scope="job"` (default): the key is the job's own (a new job with the same spec calls again);
`scope="tenant"`: one fingerprint across every job of the tenant (a re-submitted job skips it).
A recorded `result` must be a JSON-like value (stored in MongoDB); `once` returns it on a skip.
"""

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from cairn_sdk.errors import RetryableError

T = TypeVar("T")
Scope = Literal["job", "tenant"]
Mode = Literal["at_least_once", "at_most_once"]


class EffectBusy(RetryableError):
    """Another live run holds this effect (at_least_once): the shard is retried later."""


@dataclass
class Effect:
    """One guarded side effect. `skip`: do not call (done already, or in doubt at most once);
    `result`: set it after the call to record it; on a skip, the recorded one (or None)."""

    key: str
    fingerprint: str  # hex sha256: stable for (tenant, job if scope "job", key); usable as an idempotency key
    skip: bool = False
    in_doubt: bool = False  # at_most_once: an earlier attempt began and never recorded its end
    result: Any = None


class Effects(Protocol):
    """The ledger of a run (`RunContext.effects`); the worker's is backed by MongoDB."""

    def guard(self, key: str, *, scope: Scope = "job", mode: Mode = "at_least_once") -> AbstractContextManager[Effect]:
        """Hold the effect `key` for the block; see the module docstring for exact semantics.
        Raises `EffectBusy` (at_least_once: another live run holds it)."""
        ...

    def once(self, key: str, fn: Callable[[], T], *, scope: Scope = "job", mode: Mode = "at_least_once") -> T | Any:
        """Call `fn()` unless the effect is done (or in doubt, at_most_once); its return value,
        else the recorded result (None if none or in doubt). Raises what `fn` raises, `EffectBusy`."""
        ...

    def done(self, key: str, *, scope: Scope = "job") -> bool:
        """Whether the effect `key` is recorded as done."""
        ...


EffectLedger = Effects  # the name of the first draft


def run_once(effects: Effects, key: str, fn: Callable[[], T], *, scope: Scope, mode: Mode) -> T | Any:
    """`Effects.once` in terms of `guard` (every implementation shares it)."""
    with effects.guard(key, scope=scope, mode=mode) as effect:
        if not effect.skip:
            effect.result = fn()
    return effect.result


class LocalEffects:
    """An in-memory ledger with the same semantics within one process: for a pipeline's unit
    tests (`cairn_sdk.testing`), where nothing survives the process anyway."""

    def __init__(self, tenant: str = "default", job_id: str = "") -> None:
        self._tenant = tenant
        self._job_id = job_id
        self.entries: dict[str, dict[str, Any]] = {}  # fingerprint -> {"state": "pending"|"done", "result": ...}

    def fingerprint(self, key: str, scope: Scope = "job") -> str:
        return fingerprint(self._tenant, self._job_id if scope == "job" else None, key)

    @contextmanager
    def _guard(self, key: str, scope: Scope, mode: Mode) -> Iterator[Effect]:
        effect = Effect(key, self.fingerprint(key, scope))
        entry = self.entries.get(effect.fingerprint)
        if entry is not None:
            if entry["state"] == "done" or mode == "at_most_once":
                effect.skip, effect.in_doubt, effect.result = True, entry["state"] != "done", entry.get("result")
                yield effect
                return
            raise EffectBusy(f"effect {key!r} is held by another run")
        self.entries[effect.fingerprint] = {"state": "pending"}
        try:
            yield effect
        except Exception:  # not GeneratorExit (a guard abandoned unexited) nor a shutdown: the next claim takes over
            if mode == "at_least_once":
                del self.entries[effect.fingerprint]
            raise
        self.entries[effect.fingerprint] = {"state": "done", "result": effect.result}

    def guard(self, key: str, *, scope: Scope = "job", mode: Mode = "at_least_once") -> AbstractContextManager[Effect]:
        return self._guard(key, scope, mode)

    def once(self, key: str, fn: Callable[[], T], *, scope: Scope = "job", mode: Mode = "at_least_once") -> T | Any:
        return run_once(self, key, fn, scope=scope, mode=mode)

    def done(self, key: str, *, scope: Scope = "job") -> bool:
        entry = self.entries.get(self.fingerprint(key, scope))
        return entry is not None and entry["state"] == "done"


def fingerprint(tenant: str, job_id: str | None, key: str) -> str:
    """The ledger's fingerprint of an effect: sha256 hex of (tenant, job id or "*" for the
    tenant scope, key), NUL-separated (no key can forge another scope's fingerprint)."""
    return hashlib.sha256("\x00".join((tenant, "*" if job_id is None else f"job:{job_id}", key)).encode()).hexdigest()

"""Promotion's compare-and-swap: a mutex kept in MLflow around "re-read the champion, then move the aliases".

MLflow has no conditional alias update: `set_registered_model_alias` always wins. Two promotions gated against the
same champion could otherwise both move it, and the later one would replace the earlier winner without ever being
compared with it: a regression could get through. So promote takes this lock, re-reads the champion and moves the
aliases only if it is still the version it compared against (`expect_champion`); if not, it fails and names both.

The lock is a registered model, `<model>.promotion-lock`. Creating a registered model is atomic in MLflow's database
(the name is a unique key): one creator succeeds, every other gets RESOURCE_ALREADY_EXISTS and waits, polling, up to
`wait_s`, then fails naming the holder. Its tags say who holds it and since when; releasing deletes it. A lock older
than `stale_after_s` belongs to a holder that crashed: it is stolen, and the theft is logged.

Limits. Only writers that take the lock are excluded (promote does; an alias set by hand in the UI is not). Stealing
a stale lock is delete-then-create by name, and MLflow cannot make that conditional: the stealer re-reads the lock
right before deleting it, and a holder checks it still holds the lock right before it moves an alias, which narrows
the window to a holder that crashed and two contenders stealing within the same moment.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

LOCK_SUFFIX = ".promotion-lock"
OWNER, ACQUIRED_AT, PURPOSE = "seekflow.lock.owner", "seekflow.lock.acquired_at", "seekflow.lock.purpose"
WAIT_S = 120.0          # a contender gives up after this (a promotion holds the lock for seconds)
STALE_AFTER_S = 300.0   # a lock this old belongs to a crashed holder
POLL_S = 0.5


class PromotionLockError(RuntimeError):
    """The promotion lock could not be taken, or was lost: the aliases are unchanged."""


class ChampionMoved(RuntimeError):
    """The champion is no longer the version the candidate was gated against: nothing was promoted."""


def _error_code(exc: Exception) -> str | None:
    return getattr(exc, "error_code", None)


@dataclass
class LockState:
    owner: str
    acquired_at: float   # epoch seconds (the holder's tag, else the model's creation time on the server)
    purpose: str


class PromotionLock:
    def __init__(self, client, model_name: str, purpose: str, *, wait_s: float = WAIT_S,
                 stale_after_s: float = STALE_AFTER_S, poll_s: float = POLL_S,
                 log: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.client = client
        self.name = model_name + LOCK_SUFFIX
        self.purpose = purpose
        self.wait_s, self.stale_after_s, self.poll_s = wait_s, stale_after_s, poll_s
        self.log = log
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.held = False

    def read(self) -> LockState | None:
        """The lock as MLflow holds it now, or None when nobody holds it."""
        try:
            model = self.client.get_registered_model(self.name)
        except Exception as exc:   # noqa: BLE001 - MlflowException; anything else is re-raised
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        tags = model.tags or {}
        try:
            acquired = float(tags[ACQUIRED_AT])
        except (KeyError, ValueError):
            acquired = (model.creation_timestamp or 0) / 1000
        return LockState(tags.get(OWNER, "?"), acquired, tags.get(PURPOSE, ""))

    def _try_create(self) -> bool:
        try:
            self.client.create_registered_model(
                self.name, tags={OWNER: self.owner, ACQUIRED_AT: f"{time.time():.3f}", PURPOSE: self.purpose},
                description="seekflow promotion lock: held while a promotion re-reads the champion and moves the "
                            "aliases; deleted when it ends. Delete it by hand only if no promotion runs.")
            return True
        except Exception as exc:   # noqa: BLE001 - MlflowException; anything else is re-raised
            if _error_code(exc) == "RESOURCE_ALREADY_EXISTS":
                return False
            raise

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        waited = False
        while not self._try_create():
            state = self.read()
            if state is None:
                continue   # released between our create and our read: try again at once
            age = time.time() - state.acquired_at
            if age > self.stale_after_s:
                self._steal(state, age)
                continue
            if time.monotonic() >= deadline:
                raise PromotionLockError(
                    f"could not take {self.name} within {self.wait_s:g}s: held by {state.owner} "
                    f"({state.purpose or 'no purpose recorded'}) for {age:.0f}s; nothing was promoted (retry later, "
                    f"or delete that registered model if no promotion is running)")
            if not waited:
                self.log(f"promotion lock {self.name} is held by {state.owner} ({state.purpose}); waiting")
                waited = True
            time.sleep(self.poll_s)
        self.held = True

    def _steal(self, stale: LockState, age: float) -> None:
        """Delete a crashed holder's lock, unless it changed hands since we read it."""
        current = self.read()
        if current is None or current.owner != stale.owner:
            return
        self.log(f"promotion lock {self.name}: stealing it from {stale.owner} ({stale.purpose}), held for "
                 f"{age:.0f}s > {self.stale_after_s:g}s: its holder is presumed dead")
        self._delete()

    def check_held(self) -> None:
        """Right before a write: the lock must still be ours (it is not, if it was stolen as stale)."""
        state = self.read()
        if state is None or state.owner != self.owner:
            self.held = False
            raise PromotionLockError(f"lost {self.name} (now held by {state.owner if state else 'nobody'}); "
                                     f"the aliases were not moved")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            state = self.read()
            if state is not None and state.owner == self.owner:   # never delete a lock someone else took
                self._delete()
        except Exception as exc:   # noqa: BLE001 - the promotion's outcome stands; a stale lock is stolen later
            self.log(f"promotion lock {self.name}: release failed ({type(exc).__name__}: {exc}); it goes stale "
                     f"in {self.stale_after_s:g}s")

    def _delete(self) -> None:
        try:
            self.client.delete_registered_model(self.name)
        except Exception as exc:   # noqa: BLE001 - MlflowException; anything else is re-raised
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise


@contextlib.contextmanager
def promotion_lock(client, model_name: str, purpose: str, **options) -> Iterator[PromotionLock]:
    """Hold `<model_name>.promotion-lock` for the block; released (deleted) however the block ends."""
    lock = PromotionLock(client, model_name, purpose, **options)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def expect_alias(client, model_name: str, alias: str, expected: str | None, candidate: str) -> None:
    """The compare of compare-and-swap (under the lock): `alias` must still name `expected` (None: no version)."""
    aliases = client.get_registered_model(model_name).aliases or {}
    current = str(aliases[alias]) if alias in aliases else None
    if current != expected:
        def show(version):
            return f"v{version}" if version else f"no {alias}"
        raise ChampionMoved(
            f"{model_name} v{candidate} was gated against {alias} {show(expected)}, but the {alias} is now "
            f"{show(current)} (another promotion won the race); nothing was promoted: rerun promote to gate "
            f"against {show(current)}")

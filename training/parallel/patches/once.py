"""`@once`: a patch module's `apply()` patches at most once per process, however often it is called (`apply_all()`
calls it once; tests and partial setups may call it again). `apply.applied` tells whether it has; an `apply()` that
raised has not."""
from __future__ import annotations

import functools
from collections.abc import Callable


def once(apply: Callable[[], None]) -> Callable[[], None]:
    @functools.wraps(apply)
    def apply_once() -> None:
        if not apply_once.applied:
            apply()
            apply_once.applied = True

    apply_once.applied = False
    return apply_once

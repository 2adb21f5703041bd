"""The client side of the sandbox service (`training.verify.service`): send programs, get their outcomes back."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict

from training.verify.spec import Limits, Outcome


def run_remote(url: str, programs: list[str], limits: Limits = Limits(), attempts: int = 3) -> list[Outcome]:
    """Run `programs` in the sandbox service at `url`; outcomes in order. Connection errors are retried
    (`attempts` in all); a refusal (4xx) is not."""
    if not programs:
        return []
    body = json.dumps({"programs": programs, "limits": asdict(limits)}).encode()
    # Programs run `workers` at a time there; allow for every one of them taking its whole wall time.
    timeout = 60 + limits.wall_s * len(programs)
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url.rstrip("/") + "/run", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                outcomes = json.loads(response.read())["outcomes"]
            break
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"the sandbox service at {url} refused the request: HTTP {exc.code} "
                               f"{exc.read()[:500].decode(errors='replace')}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if attempt == attempts:
                raise RuntimeError(f"the sandbox service at {url} is unreachable after {attempts} attempts: "
                                   f"{exc}") from None
            time.sleep(2 ** attempt)
    if len(outcomes) != len(programs):
        raise RuntimeError(f"the sandbox service at {url} returned {len(outcomes)} outcomes for "
                           f"{len(programs)} programs")
    return [Outcome(**o) for o in outcomes]

"""Fault injection for the fault suite (tests/faults/): named points in the build where a test can make the process
die as abruptly as a power cut or the OOM killer would, instead of racing a timer against the build.

`fault_point(name)` is a no-op unless the environment variable ``DISTILL_FAULT`` names that point: ``name`` kills at
the first hit, ``name@N`` at the N-th hit in this process. The kill is SIGKILL (no clean-up, no `finally`, no
buffered output flushed), the worst case a resume must survive. Points in the code base:

    shard.mid            after each batch appended to a shard (the shard is a half-written *.tmp)
    shard.closed         after the HDF5 file of a finished shard is closed, before fsync + rename
    shard.rename         just before a finished shard's rename into place
    shard.renamed        just after the rename, before its sidecar is written
    shard.sidecar        after the sidecar is written
    write:FILENAME       inside an atomic write of FILENAME (temp written and fsynced, not yet renamed), e.g.
                         ``write:manifest.json@2`` = during the second manifest write of a build
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "DISTILL_FAULT"
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return None
    name, sep, nth = spec.rpartition("@")
    if not sep:
        return spec, 1
    try:
        return name, int(nth)
    except ValueError:
        return spec, 1  # an '@' that is part of the name


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if ``DISTILL_FAULT`` names `name` and this is the requested hit; else no-op.

    Cheap when unset (one environment lookup), so points may sit on per-batch paths."""
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == target[1]:
        os.kill(os.getpid(), signal.SIGKILL)

"""One simulated upstream per event loop, started on first use: what the `simulated` provider talks to when its
deployment names no `base_url`."""

from __future__ import annotations

import asyncio
import contextlib

from unbroken.simulator.server import SimulatedUpstream

_shared: dict[asyncio.AbstractEventLoop, tuple[SimulatedUpstream, asyncio.Future[None]]] = {}


async def shared_upstream() -> SimulatedUpstream:
    """The process's simulated upstream for the running event loop, started on first use."""
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _shared if lp.is_closed()]:  # e.g. one loop per test: free their sockets
        _shared.pop(other)[0]._release_orphaned()
    entry = _shared.get(loop)
    if entry is None:
        sim = SimulatedUpstream()
        entry = (sim, asyncio.ensure_future(sim.start()))
        _shared[loop] = entry  # registered before awaiting, so concurrent first callers share one start
    try:
        await asyncio.shield(entry[1])
    except BaseException:
        if entry[1].done() and entry[1].exception() is not None and _shared.get(loop) is entry:
            del _shared[loop]  # a failed start is retried by the next caller
        raise
    return entry[0]


async def close_shared_upstream() -> None:
    """Close the running loop's shared instance, if any (for an app's shutdown hook)."""
    entry = _shared.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        with contextlib.suppress(Exception):
            await entry[1]
        await entry[0].close()

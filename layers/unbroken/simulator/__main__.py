"""`python -m unbroken.simulator [--host 127.0.0.1] [--port 8765]`: serve until interrupted. The line
`simulated upstream on <base_url>` says it is listening (benchmarks/run.py waits for it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence

from unbroken.simulator.server import SimulatedUpstream


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unbroken.simulator",
                                     description="Simulated OpenAI Chat Completions upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with SimulatedUpstream(args.host, args.port) as sim:
            print(f"simulated upstream on {sim.base_url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()

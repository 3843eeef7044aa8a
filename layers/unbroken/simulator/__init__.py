"""A real HTTP server on 127.0.0.1 that speaks OpenAI Chat Completions (SSE), for the `simulated` demo model, tests,
demos and benchmarks.

The router reaches it through its ordinary OpenAI-Chat adapter over real HTTP, so everything between the router and
a real upstream (connection pooling, SSE parsing, error classification, mid-stream failures) is exercised. The answer
is a deterministic function of (seed, conversation), which is what lets tests check that a stream continued after a
fault concatenates to exactly the text a fault-free run produces.

Behaviour is controlled per request by string values in the body's `metadata` (see `Controls`): seed, pacing, length,
literal vs. continue-instruction continuation, prefill rejection and scripted faults counted per logical request.
README "How the simulator decides" says what it answers. Nothing here imports the router: only this package and h11.

Modules, from the wire inwards: `server` (HTTP on h11), `exchange` (one request/response), `completions` (the
answer on the wire, faults applied), `script` (what the answer is), `controls`, `faults`, `errors`, `conversation`,
`tokens`, `schema_examples`; `thread` and `shared` run a server; `python -m unbroken.simulator` serves one.
"""

from unbroken.simulator.controls import Controls
from unbroken.simulator.conversation import input_key_of
from unbroken.simulator.faults import Fault, parse_faults
from unbroken.simulator.schema_examples import example_for_schema
from unbroken.simulator.script import PREFILL_REJECTED_MESSAGE
from unbroken.simulator.server import SimulatedUpstream
from unbroken.simulator.shared import close_shared_upstream, shared_upstream
from unbroken.simulator.thread import SimulatedUpstreamThread
from unbroken.simulator.tokens import DEFAULT_LENGTH, simulated_tokens

__all__ = [
    "DEFAULT_LENGTH",
    "PREFILL_REJECTED_MESSAGE",
    "Controls",
    "Fault",
    "SimulatedUpstream",
    "SimulatedUpstreamThread",
    "close_shared_upstream",
    "example_for_schema",
    "input_key_of",
    "parse_faults",
    "shared_upstream",
    "simulated_tokens",
]

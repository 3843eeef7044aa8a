"""On Lambda, a request's counter increments (spend, rate windows) reach the store before its last byte goes out.

Lambda freezes an execution environment as soon as its invocation's response has ended, and may never thaw it
again: the counter flush loop (every 2 s) would leave what the last request counted pending in a frozen process,
invisible to the other instances' budgets. So under the Web Adapter this plain ASGI wrapper holds a response's final
body message until `runtime.counters.flush()` has run (nothing pending: no store call). Elsewhere the loop and the
flush at shutdown suffice, and this is not installed.
"""

from __future__ import annotations

from unbroken.api.guard import ASGIApp, Message, Receive, Scope, Send
from unbroken.journal.counters import CounterBatcher


class FlushBeforeLastByte:
    def __init__(self, app: ASGIApp, *, counters: CounterBatcher) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def flushing_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self.counters.flush()  # a store error keeps the sums pending (CounterBatcher.flush)
            await send(message)

        await self.app(scope, receive, flushing_send)

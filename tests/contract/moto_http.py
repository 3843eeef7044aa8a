"""moto for the DynamoDB store's httpx transport, in process.

moto intercepts botocore's HTTP sends, not httpx's. `MotoTransport` is an httpx transport that hands each request,
as signed and encoded on the wire, to the dispatcher `mock_aws` itself routes botocore's requests through, and
returns moto's answer as the HTTP response. No server thread, no port, no extra dependency (moto's own server mode
would need `moto[server]`, i.e. Flask). Use it inside `mock_aws()` with the store on its default AWS endpoint.
"""

from __future__ import annotations

from typing import Any

import httpx
from botocore.awsrequest import AWSPreparedRequest
from botocore.compat import HTTPHeaders


class MotoTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        from moto.core.models import botocore_stubber

        headers = HTTPHeaders()
        for name, value in request.headers.items():
            headers[name] = value
        body = await request.aread()
        self.requests += 1
        answer: Any = botocore_stubber.process_request(
            AWSPreparedRequest(method=request.method, url=str(request.url), headers=headers, body=body,
                               stream_output=False)
        )
        if answer is None:  # not a URL moto serves
            raise httpx.ConnectError(f"moto does not serve {request.url}", request=request)
        status, response_headers, content = answer
        if isinstance(content, str):
            content = content.encode()
        # moto's headers say what it would send; the framing (length) is httpx's to set for the body given here
        clean = {k: str(v) for k, v in dict(response_headers).items() if k.lower() not in ("content-length", "status")}
        return httpx.Response(int(status), headers=clean, content=content, request=request)

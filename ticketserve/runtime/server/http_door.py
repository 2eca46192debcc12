"""What stands between a socket and the HTTP routes, so that hostile input costs little and
harms no other client: uvicorn's HTTP/1.1 protocol with a deadline for each request's head and
body (uvicorn itself times out only idle keep-alive connections), and the outermost ASGI
middleware, which reads only the headers it needs (as octets: a byte ≥ 0x80 is no error),
refuses an unauthenticated request before reading its body, a body over the limit unread, and a
JSON body holding a lone surrogate (not Unicode text); it also splits v2 binary tensor data off
the JSON part. Its refusals are counted like every other answer."""

from __future__ import annotations

import json
import re

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ticketserve.core.errors import TicketserveError
from ticketserve.runtime.server.auth import Tokens, bearer
from ticketserve.runtime.server.observe import new_request_id
from ticketserve.runtime.status import http_status_of

BINARY_HEADER = "inference-header-content-length"  # the v2 binary tensor data extension
BINARY = "ticketserve.binary"  # ASGI scope key: the binary part of a v2 request
PUBLIC = ("/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs")
ADMIN_PATH = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
READ = (b"authorization", b"content-length", BINARY_HEADER.encode())


def method_label(method: str) -> str:
    """A request's method as a metric label: one of a closed set (an invented method is `other`)."""
    return method if method in METHODS else "other"


def lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body decodes to a string with a lone surrogate (`"\\ud800"` is valid JSON,
    but no text). Only bodies that spell a surrogate escape are parsed here; one that is not
    JSON at all is left to the route's own 400."""
    if not SURROGATE_ESCAPE.search(body):
        return False
    try:
        json.dumps(json.loads(body), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


class Front:
    """ASGI middleware, outermost."""

    def __init__(self, app, max_bytes: int, tokens: Tokens, count):
        self.app, self.max_bytes, self.tokens, self.count = app, max_bytes, tokens, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, list[str]] = {}
        for key, value in scope["headers"]:
            if key.lower() in READ:
                headers.setdefault(key.lower(), []).append(value.decode("latin-1"))
        path = scope["path"]
        if path not in PUBLIC:
            try:
                self.tokens.check(bearer(headers.get(b"authorization", [])), admin=bool(ADMIN_PATH.match(path)))
            except TicketserveError as exc:
                return await self._refuse(scope, send, http_status_of(exc), str(exc))
        length = (headers.get(b"content-length") or ["0"])[0]  # h11 has refused a malformed one
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, send, 413)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, send, 413)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if BINARY_HEADER.encode() in headers:
            declared = headers[BINARY_HEADER.encode()][0]
            split = int(declared) if declared.isascii() and declared.isdigit() else -1
            if not 0 <= split <= len(body):
                return await self._refuse(scope, send, 400, f"{BINARY_HEADER} {declared[:32]!r} does not fit the body")
            body, scope = body[:split], scope | {BINARY: body[split:]}
            dropped = (b"content-length", b"content-type", BINARY_HEADER.encode())
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() not in dropped]
            scope["headers"] += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
        if lone_surrogate(body):
            return await self._refuse(scope, send, 400, "the JSON body holds a lone surrogate (a \\ud800-\\udfff escape "
                                                        "without its pair): texts must be valid Unicode")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, send, status: int, message: str | None = None) -> None:
        body = json.dumps({"error": message or f"request body over {self.max_bytes:,} bytes"}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", new_request_id().encode())]})
        await send({"type": "http.response.body", "body": body})
        self.count(f"HTTP {method_label(scope['method'])} refused at the door", str(status))


class DeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 with a deadline for each request: from a connection's first moment,
    and from the first byte of each later request on it, the whole head and body must arrive
    within `request_seconds`, or the client gets 408 and the connection is closed (an idle,
    half-sent or trickling client would hold its socket forever)."""

    request_seconds: float = 30.0
    _deadline = None

    @classmethod
    def with_deadline(cls, seconds: float) -> type[DeadlineH11]:
        return type(cls.__name__, (cls,), {"request_seconds": seconds})

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # a new request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is complete (or the connection is done)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.request_seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            if self.cycle.response_started:
                return  # answering already: the request is no longer the client's to finish
            self.cycle.disconnected = True  # the app's receive() now says so; what it sends is dropped
            self.cycle.message_event.set()
        body = b'{"error":"request not complete within %d s"}' % self.request_seconds
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()

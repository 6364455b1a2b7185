"""Per-connection limits of the HTTP service: body and header sizes, header and body deadlines (slowloris).

``HttpLimits`` says what one client may send and how slowly; ``LimitedHttpProtocol`` enforces it inside
uvicorn's httptools protocol, where the connection is (the app alone can only count a body's bytes). A
refusal is a JSON 408, 413 or 431 whose message names the limit and the flag that raises it, never the
request's own bytes. ``service.server_config`` puts both into uvicorn's configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

CloseReason = Literal["header_timeout", "body_timeout", "headers_too_large", "body_too_large"]
# Key in a request's ASGI ``scope["state"]``: set when the server cut the request off for a limit.
REFUSED = "omnisearchsage_refused"


@dataclass(frozen=True)
class HttpLimits:
    """What one client may send and how slowly: the service's defences against oversized and slow requests.

    Args:
        max_body_bytes: Largest request body (default 65,536; a search request is well under 1 KB). A
            larger one gets a 413 as soon as its ``Content-Length`` (before reading it) or its streamed
            bytes pass the limit, and the connection is closed.
        max_header_bytes: Largest request line plus headers (default 16,384, as h11's default); more gets
            a 431 and the connection is closed.
        header_timeout: Seconds from a connection's opening, or from the first byte of its next request,
            until the request's headers are complete (default 10). Later: a 408 and the connection is
            closed, whatever the client trickles meanwhile (slowloris).
        body_timeout: Seconds from the end of the headers until the whole body has arrived (default 10).
            Later: a 408 (unless a response has started) and the connection is closed.
        keep_alive_timeout: Seconds an idle keep-alive connection is kept between requests (default 5;
            uvicorn's ``timeout_keep_alive``).
        max_connections: Open connections plus running requests at most; more get a 503 from uvicorn
            (default None: no limit; uvicorn's ``limit_concurrency``). Slow connections count too, so a
            tight limit turns a slowloris flood into 503s for everyone: the timeouts are the first defence.
    """

    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int | None = None

    def __post_init__(self):
        for name, kind in (("max_body_bytes", int), ("max_header_bytes", int), ("header_timeout", int | float),
                           ("body_timeout", int | float), ("keep_alive_timeout", int | float)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
                what = "an int" if kind is int else "a number"
                raise ValueError(f"{_limit_name(name)} must be {what} > 0, got {value!r}.")
        count = self.max_connections
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"{_limit_name('max_connections')} must be None or an int >= 1, got {count!r}.")


def _limit_name(field: str) -> str:
    """A limit as both users know it: the Python field and the command's flag."""
    return f"HttpLimits.{field} (omnisearchsage-serve --{field.replace('_', '-')})"


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with deadlines for a request's headers and body, and size caps.

    uvicorn closes only idle keep-alive connections: a connection that opens and sends nothing, or sends its
    headers or body a byte at a time (slowloris), is held forever, and httptools buffers a header of any
    size (re-concatenating it per chunk). Here each connection is in one of three phases, each bounded:

    - ``headers``: from the opening, or the first byte of the next request, until the headers are complete:
      ``limits.header_timeout`` at most, and ``limits.max_header_bytes`` (counted as bytes arrive, so a
      header that never ends is cut off too);
    - ``body``: from the end of the headers until the end of the body: ``limits.body_timeout`` at most, and
      ``limits.max_body_bytes`` (a larger ``Content-Length`` is refused before the app runs);
    - ``idle``: the request is in (the app may still be answering; uvicorn's keep-alive timer runs after).

    Past a limit the connection gets a JSON 408, 413 or 431 (unless a response was already started), the
    request being served, if any, ends as if its client had gone, ``on_close(reason)`` is called, and the
    connection is closed by a lingering close: the answer is followed by a FIN, and what the client still
    sends is read and dropped for up to ``LINGER_SECONDS``. Closing at once would reset a client that is
    still writing its body, and the reset can destroy the answer unread in its socket.
    Built on uvicorn 0.30-0.54's ``HttpToolsProtocol`` callbacks (``tests/test_serving_http.py`` runs it).
    """

    LINGER_SECONDS = 1.0

    def __init__(self, *args, limits: HttpLimits, on_close: Callable[[CloseReason], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.on_close = on_close
        self._phase: Literal["headers", "body", "idle"] = "idle"
        self._deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # of the current request's headers so far
        self._body_bytes = 0  # of the current request's body so far
        self._messages = 0  # requests whose body ended (tells whether a chunk held the end of one)
        self._refused = False  # answered and lingering: nothing more is parsed

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._enter("headers", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter("idle")
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and dropped
        if self._phase == "idle":
            self._enter("headers", self.limits.header_timeout)
        messages = self._messages
        super().data_received(data)
        if self._phase == "headers" and not self._refused:
            # All of this chunk is header bytes, unless a request ended in it (pipelining): then count from 0.
            self._header_bytes = 0 if self._messages != messages else self._header_bytes + len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse("headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._body_bytes = 0
        if self._phase != "headers":  # a pipelined request, begun in the chunk that ended the previous one
            self._enter("headers", self.limits.header_timeout)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        # Exact here, where a single chunk may have carried the whole request.
        if (
            len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            > self.limits.max_header_bytes
        ):
            self._refuse("headers_too_large")
            return
        declared = dict(self.headers).get(b"content-length")  # httptools has checked it is a number
        if declared is not None and int(declared) > self.limits.max_body_bytes:
            self._refuse("body_too_large")
            return
        self._enter("body", self.limits.body_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:  # a chunked body has no Content-Length to check
            self._refuse("body_too_large")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._messages += 1
        self._enter("idle")
        super().on_message_complete()

    def _enter(self, phase: Literal["headers", "body", "idle"], timeout: float | None = None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        self._header_bytes = 0
        if timeout is not None:
            reason = "header_timeout" if phase == "headers" else "body_timeout"
            self._deadline = self.loop.call_later(timeout, self._refuse, reason)

    def _refuse(self, reason: CloseReason) -> None:
        """Answer with the reason's status unless a response was started, end the request, close lingering."""
        phase, cycle = self._phase, self.cycle  # in the headers phase, `cycle` is the previous request's
        self._enter("idle")
        self._refused = True
        self.on_close(reason)
        if cycle is not None and not cycle.response_complete:  # as connection_lost does: the app's reads end
            cycle.disconnected = True  # and its writes go nowhere
            cycle.message_event.set()
            cycle.scope.setdefault("state", {})[REFUSED] = reason  # the app counts this, not a client disconnect
        if not (cycle is not None and cycle.response_started and (phase == "body" or not cycle.response_complete)):
            status, template = REFUSALS[reason]
            body = orjson.dumps({"error": template.format(limits=self.limits)})
            head = [STATUS_LINE[status]]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body)]
            self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then sees the end (eof_received closes)
        self.flow.resume_reading()  # keep draining what the client still sends, so closing does not reset it
        self._deadline = self.loop.call_later(self.LINGER_SECONDS, self.transport.close)


REFUSALS: dict[CloseReason, tuple[int, str]] = {
    "header_timeout": (
        408,
        "The request headers did not arrive within {limits.header_timeout:g} s. Send them at once, or start the "
        "service with a larger omnisearchsage-serve --header-timeout.",
    ),
    "body_timeout": (
        408,
        "The request body did not arrive within {limits.body_timeout:g} s of its headers. Send it at once, or start "
        "the service with a larger omnisearchsage-serve --body-timeout.",
    ),
    "body_too_large": (
        413,
        "The request body is larger than {limits.max_body_bytes} bytes, this service's limit. Send a smaller body, "
        "or start the service with a larger omnisearchsage-serve --max-body-bytes.",
    ),
    "headers_too_large": (
        431,
        "The request line and headers exceed {limits.max_header_bytes} bytes. Send fewer or shorter headers, or "
        "start the service with a larger omnisearchsage-serve --max-header-bytes.",
    ),
}


def refusal(reason: CloseReason, limits: HttpLimits) -> tuple[int, str]:
    """The HTTP status and the message a request refused for ``reason`` gets."""
    status, template = REFUSALS[reason]
    return status, template.format(limits=limits)


__all__ = ["REFUSALS", "REFUSED", "CloseReason", "HttpLimits", "LimitedHttpProtocol", "refusal"]

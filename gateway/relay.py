"""A download relayed from upstream to the client, stopped as soon as either side ends.

Starlette's StreamingResponse cannot be trusted to notice a client that has gone: from
ASGI spec 2.4 on it does not listen for `http.disconnect` at all, and below it the
listener is a separate task that only runs when the stream waits. uvicorn drops a
send to a closed connection without waiting, and a fast upstream keeps the read
buffer full, so the loop can go on pulling a whole file into nowhere. Here the stream
runs in a task of its own that a disconnect cancels at once, even while it waits on a
stalled upstream, and the stream also asks, once per chunk, whether the client is
still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .errors import UpstreamError
from .upstream import Download

log = logging.getLogger("gateway.videos")


class _CutOff(Exception):
    """The client accepted nothing for `send_timeout_s`."""


class Relay(Response):
    """Upstream's bytes to the client, one chunk in flight at a time.

    A slow reader is served as long as bytes keep moving, but one that accepts nothing
    for `send_timeout_s` (`limits.client_idle_timeout_s`) is cut off, so it cannot hold
    a connection, a request and an upstream connection forever. A stream cut upstream
    (counted as an upstream error) aborts the client's connection too, so the client
    cannot mistake a partial body for the whole one. However it ends, the upstream
    connection is released and `on_close` runs (the download's budget claim).
    """

    def __init__(
        self,
        download: Download,
        *,
        headers: Mapping[str, str],
        send_timeout_s: float,
        on_close: Callable[[], None],
    ) -> None:
        self.download = download
        self.status_code = download.status
        self.send_timeout_s = send_timeout_s
        self.on_close = on_close
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        stream = asyncio.create_task(self._stream(send, gone))
        watcher = asyncio.create_task(_until_disconnect(receive, gone))
        try:
            await asyncio.wait((stream, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            try:
                stream.cancel()
                watcher.cancel()
                # Both awaited: an exception in either is retrieved, never left behind.
                await asyncio.gather(stream, watcher, return_exceptions=True)
            finally:
                self.download.close()
                self.on_close()
        error = None if stream.cancelled() else stream.exception()
        if error is not None:
            raise error  # none of the endings `_stream` expects

    async def _stream(self, send: Send, gone: asyncio.Event) -> None:
        """Relay to the end, or end quietly after one log line.

        A cut-off reader or an upstream break ends the answer unfinished: the server
        then closes the connection, so the client sees a cut, never a short file as
        whole. Raising instead would log a traceback per cut-off reader.
        """
        try:
            await self._send(
                send, {"type": "http.response.start", "status": self.status_code,
                       "headers": self.raw_headers}
            )  # fmt: skip
            async with contextlib.aclosing(self.download.chunks()) as chunks:
                async for chunk in chunks:
                    await self._send(
                        send, {"type": "http.response.body", "body": chunk, "more_body": True}
                    )
                    # Neither the send nor a full read buffer need wait: give the watcher
                    # its turn, then stop pulling upstream if the client has gone.
                    await asyncio.sleep(0)
                    if gone.is_set():
                        return
            await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError as exc:
            log.warning("upstream stream broke mid-download", extra={"code": exc.code})
        except _CutOff:
            log.warning("cut off a download whose client stopped reading")

    async def _send(self, send: Send, message: Message) -> None:
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await send(message)
        except TimeoutError:
            raise _CutOff from None


async def _until_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    """Set `gone` when the server reports the client's disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()

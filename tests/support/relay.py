"""TCP relays between gateway replicas and the simulator, one a replica, watching creates.

The simulator's request log cannot tell which replica sent a request, and it keeps only
the last thousand. A relay per replica can: it passes the bytes through untouched and
notes each `POST /v1/videos` that goes through it (when it was sent, the job tag found in
its body, when its answer began, or that the connection closed first). So a test can
kill the replica whose create has not been answered yet, and count each team's starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from dataclasses import dataclass, field

CREATE_LINES = (b"POST /v1/videos ", b"POST /v1/videos?")
MAX_SNIFF_BYTES = 1 << 20  # how much of a create's body is searched for its tag


@dataclass
class Create:
    """One create a replica sent upstream; times are `time.monotonic()`."""

    relay: int
    sent: float
    tag: str | None = None
    answered: float | None = None
    cut: bool = False  # the connection closed before any byte of an answer

    @property
    def pending(self) -> bool:
        return self.answered is None and not self.cut


@dataclass
class _Connection:
    """Where one kept-alive connection is: HTTP/1.1 without pipelining, so client bytes
    after an answer began are the next request."""

    expect_request: bool = True
    create: Create | None = None
    body: bytearray = field(default_factory=bytearray)


class Relays:
    """`count` relays to 127.0.0.1:`target_port`, served by one event loop in a thread."""

    def __init__(self, target_port: int, count: int, tag: re.Pattern[bytes]) -> None:
        self._target = target_port
        self._count = count
        self._tag = tag
        self._lock = threading.Lock()
        self._creates: list[Create] = []
        self.ports: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relays", daemon=True)

    def __enter__(self) -> Relays:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("the relays did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def creates(self) -> list[Create]:
        """Every create seen so far, in the order they were sent (copies)."""
        with self._lock:
            return [Create(**vars(create)) for create in self._creates]

    def sent(self) -> int:
        with self._lock:
            return len(self._creates)

    def pending(self, since: float) -> list[Create]:
        """Creates sent at or after `since` with no answer yet, on an open connection."""
        return [c for c in self.creates() if c.sent >= since and c.pending]

    # -- the loop's side

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        servers = []
        for index in range(self._count):
            server = await asyncio.start_server(
                lambda r, w, i=index: self._serve(i, r, w), "127.0.0.1", 0
            )
            servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stop.wait()
        for server in servers:
            server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    async def _serve(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        except OSError:
            writer.close()
            return
        state = _Connection()
        pumps = {
            asyncio.create_task(self._requests(index, reader, up_writer, state)),
            asyncio.create_task(self._answers(up_reader, writer, state)),
        }
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for side in (writer, up_writer):
                side.close()
            with self._lock:
                if state.create is not None and state.create.answered is None:
                    state.create.cut = True

    async def _requests(
        self,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: _Connection,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                self._note_request(index, data, state)  # before upstream can see it
                writer.write(data)
                await writer.drain()

    def _note_request(self, index: int, data: bytes, state: _Connection) -> None:
        with self._lock:
            if state.expect_request:
                state.expect_request = False
                state.create = None
                state.body.clear()
                if data.startswith(CREATE_LINES):
                    state.create = Create(index, time.monotonic())
                    self._creates.append(state.create)
            create = state.create
            if create is not None and create.tag is None and len(state.body) < MAX_SNIFF_BYTES:
                state.body += data
                found = self._tag.search(state.body)
                if found:
                    create.tag = found.group(0).decode()

    async def _answers(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Connection
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                with self._lock:
                    state.expect_request = True
                    if state.create is not None and state.create.answered is None:
                        state.create.answered = time.monotonic()
                writer.write(data)
                await writer.drain()

"""The daemon's end of a worker's socket sends the frames written in one turn of the event loop
together at the turn's end, holds those written while one read's results are handled until
`uncork` (`_Link.cork`), never more than `CORK_MAX` bytes, always in order. A real socket
pair, a real event loop: what the worker's end receives."""

from __future__ import annotations

import asyncio
import socket

from tsctl.ipc.codec import FrameReader, encode
from tsctl.ipc.messages import Batch, Part, WireRequest
from tsctl.server.workers.process import CORK_MAX, _Link

HANG_GUARD = 30.0  # seconds: not a timing, a bound on a test that would otherwise hang


def _frame(batch_id: int, body: bytes = b"x") -> list[bytes | bytearray | memoryview]:
    request = WireRequest(f"r{batch_id}", [Part("body", "", body)], [])
    return encode(Batch(batch_id, [request]))


def _received(peer: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(chunk)


def _ids(data: bytes) -> list[int]:
    messages = FrameReader().feed(data)
    return [message.batch_id for message in messages if isinstance(message, Batch)]


async def _linked() -> tuple[_Link, socket.socket]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    link = _Link(None, lambda messages: None, lambda exc: None)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: link, ours)
    return link, peer


def test_frames_written_in_one_turn_go_together_at_its_end() -> None:
    async def main() -> None:
        link, peer = await _linked()
        link.write(_frame(1))
        link.write(_frame(2))
        assert _received(peer) == b""  # not at once: at the end of this turn
        await asyncio.sleep(0)
        assert _ids(_received(peer)) == [1, 2]
        link.write(_frame(3))
        await asyncio.sleep(0)
        assert _ids(_received(peer)) == [3]  # the next turn's, at its end
        assert link.transport is not None
        link.transport.close()
        peer.close()

    asyncio.run(main())


def test_frames_written_while_corked_go_in_one_send_in_order() -> None:
    async def main() -> None:
        link, peer = await _linked()
        link.cork()
        for batch_id in (2, 3, 4):
            link.write(_frame(batch_id))
        await asyncio.sleep(0)
        assert _received(peer) == b""  # held past the turn's end
        link.uncork()
        assert _ids(_received(peer)) == [2, 3, 4]
        link.write(_frame(5))
        await asyncio.sleep(0)
        assert _ids(_received(peer)) == [5]  # uncorked again: at the turn's end
        assert link.transport is not None
        link.transport.close()
        peer.close()

    asyncio.run(main())


def test_a_cork_never_holds_more_than_cork_max() -> None:
    async def main() -> None:
        link, peer = await _linked()
        link.cork()
        link.write(_frame(1))
        big = b"y" * CORK_MAX
        link.write(_frame(2, big))  # over the bound: what is held goes first, then this one
        data = b""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + HANG_GUARD
        while len(_ids(data)) < 2 and loop.time() < give_up:  # it may go in pieces
            await asyncio.sleep(0)  # the transport writes what the socket did not take
            data += _received(peer)
        assert _ids(data) == [1, 2]
        link.write(_frame(3))  # still corked, held again
        await asyncio.sleep(0)
        assert _received(peer) == b""
        link.uncork()
        await asyncio.sleep(0)
        assert _ids(_received(peer)) == [3]
        assert link.transport is not None
        link.transport.close()
        peer.close()

    asyncio.run(main())

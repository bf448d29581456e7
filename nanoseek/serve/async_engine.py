"""The bridge between one `LLM` and many HTTP handlers: a thread runs engine steps, handlers await deltas.

Handlers never wait for a step: `add` validates at once (InvalidRequest for bad input) and puts the request
in an inbox; `abort` does the same. The engine thread drains the inbox between steps, so a client that
goes away frees its cache blocks within one step, and hands each step's deltas to the event loop in one
call. Only the engine thread touches the LLM.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from dataclasses import dataclass

from ..engine import LLM, InvalidRequest, SamplingParams
from ..engine.llm import StreamDelta

log = logging.getLogger("nanoseek.serve")


def server_threads(requested: int | None = None) -> int:
    """Torch threads for the engine thread of a server: `requested`, or all cores but one. The engine's torch
    ops and the HTTP event loop share the CPU: leave the loop a core of its own, or every stall of the loop
    also stalls all of torch's worker threads at their next barrier."""
    return requested or max(1, (os.cpu_count() or 2) - 1)


class EngineError(RuntimeError):
    """The engine failed while stepping; the requests in flight at that moment are failed with it."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    unfinished: int  # samples of the request still generating


class AsyncEngine:
    def __init__(self, llm: LLM):
        self.llm = llm
        self._lock = threading.Lock()  # guards the inbox and the stream table
        self._work = threading.Event()
        self._inbox: list[tuple[str, list[int], SamplingParams] | str] = []  # new requests, or ids to abort
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._work.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- handler side --------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request (call from the event loop); its deltas arrive on the returned queue, then None."""
        prompt_ids = self.llm.encode(prompt_ids)
        self.llm.check_request(prompt_ids, params)
        request_id = f"srv-{next(self._ids)}"
        with self._lock:
            self._streams[request_id] = stream = _Stream(
                asyncio.get_running_loop(), asyncio.Queue(), params.n
            )
            self._inbox.append((request_id, prompt_ids, params))
        self._work.set()
        return request_id, stream.queue

    def abort(self, request_id: str) -> None:
        """Cancel a request (idempotent); its blocks are freed before the next engine step."""
        with self._lock:
            if self._streams.pop(request_id, None) is not None:
                self._inbox.append(request_id)
        self._work.set()

    def stats(self) -> dict[str, int]:
        """Approximate live figures for /metrics (read without stopping the engine)."""
        s, blocks = self.llm.scheduler, self.llm.blocks
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "blocks_used": len(blocks.ref) - blocks.num_free,
            "blocks_total": len(blocks.ref),
        }

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._work.wait()
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for item in inbox:
                if isinstance(item, str):
                    self.llm.abort(item)
                    continue
                with self._lock:
                    if item[0] not in self._streams:  # failed or cancelled before it started
                        continue
                try:
                    self.llm.add_request(item[1], item[2], request_id=item[0])
                except InvalidRequest as e:  # checked in `add`; only a changed engine could get here
                    self._fail(item[0], EngineError(str(e)))
            if not self.llm.has_unfinished():
                with self._lock:
                    if not self._inbox:
                        self._work.clear()
                continue
            try:
                deltas = self.llm.step()
            except Exception as e:  # never let one bad step kill the server: fail what was in flight
                log.exception("engine step failed")
                self._fail_all(EngineError(f"engine step failed: {e}"))
                continue
            self._deliver(deltas)

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        """Hand one step's deltas to the event loop(s) in a single call each."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        with self._lock:
            for d in deltas:
                stream = self._streams.get(d.request_id)
                if stream is None:
                    continue  # aborted: its abort is already in the inbox
                out = batches.setdefault(stream.loop, [])
                out.append((stream.queue, d))
                if d.finish_reason is not None:
                    stream.unfinished -= 1
                    if stream.unfinished == 0:
                        del self._streams[d.request_id]
                        self._inbox.append(d.request_id)  # drop the request's bookkeeping in the engine
                        out.append((stream.queue, None))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail(self, request_id: str, error: Exception) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        self.llm.abort(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(_put_all, [(stream.queue, error)])

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self._fail(request_id, error)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)

"""The bridge between one `LLM` and many HTTP handlers: a thread runs engine steps, handlers await deltas.

Handlers call `add` (validation errors come back at once as ValueError) and read their request's deltas
from an asyncio queue; `abort` is applied before the next engine step, so a client that goes away frees
its cache blocks within one step. All engine state is touched only under one lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from ..engine import LLM, SamplingParams
from ..engine.llm import StreamDelta

log = logging.getLogger("nanoseek.serve")


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
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._aborts: list[str] = []
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

    # ---- handler side --------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request (call from the event loop); its deltas arrive on the returned queue, then None."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        with self._lock:
            request_id = self.llm.add_request(prompt_ids, params)
            self._streams[request_id] = stream
        self._work.set()
        return request_id, stream.queue

    def abort(self, request_id: str) -> None:
        """Cancel a request (idempotent); its blocks are freed before the next engine step."""
        with self._lock:
            if self._streams.pop(request_id, None) is not None:
                self._aborts.append(request_id)
        self._work.set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            s, blocks = self.llm.scheduler, self.llm.blocks
            return {"running": len(s.running), "waiting": len(s.waiting),
                    "blocks_used": sum(r > 0 for r in blocks.ref), "blocks_total": len(blocks.ref)}

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._work.wait()
            with self._lock:
                for request_id in self._aborts:
                    self.llm.abort(request_id)
                self._aborts.clear()
                if not self.llm.has_unfinished():
                    self._work.clear()
                    continue
                try:
                    deltas = self.llm.step()
                except Exception as e:  # never let one bad step kill the server: fail what was in flight
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"engine step failed: {e}"))
                    continue
                for d in deltas:
                    self._deliver(d)

    def _deliver(self, d: StreamDelta) -> None:
        stream = self._streams.get(d.request_id)
        if stream is None:
            return
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, d)
        if d.finish_reason is not None:
            stream.unfinished -= 1
            if stream.unfinished == 0:
                del self._streams[d.request_id]
                self.llm.abort(d.request_id)  # all samples done: drop the request's bookkeeping
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, None)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.llm.abort(request_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        self._streams.clear()

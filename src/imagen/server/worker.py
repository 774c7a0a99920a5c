"""The one model thread of the server: a bounded admission count, a queue, and batches of
compatible requests (same settings, no image input) run through the pipeline together; and
:meth:`ModelWorker.run`, the one way a route queues a job and waits for it."""

import asyncio
import copy
import queue
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from imagen.diffusion.samplers import Cancelled, Progress
from imagen.models.stage import Edit
from imagen.pipeline import ImagenPipeline, SamplingOverrides
from imagen.server.schema import ServerConfig


@dataclass
class Job:
    """One accepted request: what to make, and how its answer gets back to the event loop."""

    prompt: str
    num_images: int
    overrides: SamplingOverrides
    seed: int
    client_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    negative_prompt: str = ""
    edit: Edit | None = None  # image-to-image or inpainting input: never batched with others
    stages: int = 0  # run the first this many stages only (0: all); a stage's size is its output
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] = field(default_factory=lambda: {"state": "queued"})

    @property
    def key(self) -> tuple[SamplingOverrides, int, int]:
        """Jobs with equal keys can share a forward pass."""
        return (self.overrides, self.stages, 0 if self.edit is None else id(self))

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def set_result() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(set_result)


def random_seed() -> int:
    """A seed for a request that gives none (reported in the answer, so it can be reused)."""
    return int.from_bytes(uuid.uuid4().bytes[:4], "little")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class QueueFull(Exception):
    """``max_queue`` requests are waiting or running already."""


class ClientGone(Exception):
    """The client went away before its answer was ready."""


class ModelWorker:
    """The one thread that runs the model, taking jobs from the queue in batches. At most
    ``max_queue`` jobs are admitted (waiting or running) at a time."""

    def __init__(self, pipe: ImagenPipeline, config: ServerConfig) -> None:
        self.pipe, self.config = pipe, config
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.progress: dict[str, dict[str, Any]] = {}
        self.batches_run = 0
        self.admitted = 0  # jobs waiting or running
        self._deferred: list[Job] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="imagen-model", daemon=True)
        # the first k stages of the cascade, for k below all: made once, sharing the modules
        self._pipes = {k: self._first_stages(k) for k in range(1, len(pipe.cascade.stages))}

    def _first_stages(self, k: int) -> ImagenPipeline:
        part = copy.copy(self.pipe)  # the same settings, the first k stages only
        part.cascade = self.pipe.cascade.first_stages(k)
        return part

    def pipeline(self, stages: int = 0) -> ImagenPipeline:
        """The pipeline that runs the first ``stages`` stages (0 or all: the model's own; fewer
        share its modules, so they cost no memory)."""
        return self._pipes.get(stages, self.pipe)

    async def run(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]]) -> Any:
        """Queue ``job`` and wait for its result, watching for the client to leave: QueueFull
        when the queue is full, ClientGone when the client left (the job is then dropped, or
        its batch stopped), the generation's own exception when it failed."""
        if not self.submit(job):
            raise QueueFull
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=0.25)
            if not job.future.done() and await is_disconnected():
                job.cancelled.set()  # the worker drops it, or stops its batch
                # nobody awaits the answer now: take it when it comes, so asyncio does not
                # log "Future exception was never retrieved" for the Cancelled it ends with
                job.future.add_done_callback(_retrieve)
                raise ClientGone
        try:
            return job.future.result()
        except Cancelled:
            raise ClientGone from None

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if not self.thread.is_alive() and not self._stop.is_set():
                self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when ``max_queue`` jobs are waiting or running already."""
        self.start()
        with self._lock:
            if self.admitted >= self.config.max_queue:
                return False
            self.admitted += 1
        self.jobs.put_nowait(job)
        self.progress[job.client_id] = job.progress
        while len(self.progress) > 1000:  # keep the newest entries only
            self.progress.pop(next(iter(self.progress)))
        return True

    def pending(self) -> int:
        """Jobs waiting (not running)."""
        return self.jobs.qsize() + len(self._deferred)

    def _finish(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self.admitted -= 1
        job.finish(result, error)

    def _next(self, timeout: float) -> Job | None:
        if self._deferred:
            return self._deferred.pop(0)
        try:
            return self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None

    def _gather(self, first: Job) -> list[Job]:
        batch, images = [first], first.num_images
        deadline = time.monotonic() + self.config.batch_wait_s
        while images < self.config.max_batch_images:
            job = self._next(max(0.0, deadline - time.monotonic()))
            if job is None:
                break
            if job.key == first.key and images + job.num_images <= self.config.max_batch_images:
                batch.append(job)
                images += job.num_images
            else:
                self._deferred.append(job)
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._next(0.1)
            if first is None:
                continue
            batch = []
            for job in self._gather(first):
                if job.cancelled.is_set():  # its client left while it waited: never run it
                    self._finish(job, error=Cancelled("the client went away"))
                else:
                    batch.append(job)
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        prompts, negatives, seeds, owner = [], [], [], []
        for j in batch:
            j.progress.update(state="running", stage=0, step=0)
            for i in range(j.num_images):
                prompts.append(j.prompt)
                negatives.append(j.negative_prompt)
                seeds.append(j.seed + i)
                owner.append(j)

        def progress(p: Progress) -> bool:
            if all(j.cancelled.is_set() for j in batch):
                return False  # every client has gone: stop at this step
            for j in batch:
                j.progress.update(
                    stage=p.stage,
                    step=p.step,
                    steps=p.steps,
                    stages=p.stages,
                    fraction=round(p.fraction, 4),
                )
            return True

        started = time.time()
        try:
            pipe = self.pipeline(batch[0].stages)
            out = pipe.generate(
                prompts,
                seeds,
                batch[0].overrides,
                batch_size=len(prompts),
                edit=batch[0].edit,
                progress=progress,
                negative_prompts=negatives,
            )
        except BaseException as e:  # every accepted request gets an answer, even on failure
            for j in batch:
                j.progress.update(state="cancelled" if isinstance(e, Cancelled) else "failed")
                self._finish(j, error=e)
            return
        self.batches_run += 1
        elapsed = time.time() - started
        for j in batch:
            images = [img for img, o in zip(out.images, owner, strict=True) if o is j]
            j.progress.update(state="done", fraction=1.0)
            self._finish(
                j,
                {
                    "images": images,
                    "batch_size": len(prompts),
                    "seconds": elapsed,
                    "sampling": out.sampling,
                    # its own prompt's (a batch holds other clients' prompts too)
                    "warnings": pipe.check_words([j.prompt]),
                },
            )

"""``imagen serve``: an HTTP API and a web page over the pipeline (FastAPI + uvicorn).

Requests go through a bounded queue to one model worker thread. The worker batches queued
requests with the same settings (guidance, steps, sampler) into one forward pass, up to
``max_batch_images``. A full queue answers 429 with Retry-After; an accepted request is always
answered; a request whose client has gone is dropped before it reaches the model, and a
running batch whose clients have all gone is abandoned at the next denoiser step.
"""

import asyncio
import base64
import io
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Literal

from imagen.pipeline import ImagenPipeline


@dataclass
class ServerConfig:
    """Limits and queueing of the server; every limit is enforced and published in the
    OpenAPI schema."""

    host: str = "127.0.0.1"  # listen on loopback unless told otherwise
    port: int = 8000
    max_queue: int = 16  # requests waiting or running; more get 429
    max_batch_images: int = 8  # images in one batched forward pass
    batch_wait_s: float = 0.02  # how long the worker waits to fill a batch
    max_prompt_chars: int = 300
    max_images: int = 4  # per request
    max_steps: int = 100
    max_guidance: float = 20.0
    retry_after_s: int = 2


class Cancelled(Exception):
    """Every client of a running batch has gone away."""


@dataclass
class Job:
    prompt: str
    num_images: int
    guidance: float
    steps: int
    sampler: str
    seed: int
    client_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: dict[str, Any] = field(default_factory=lambda: {"state": "queued"})

    @property
    def key(self) -> tuple[float, int, str]:
        return (self.guidance, self.steps, self.sampler)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        def set_result() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(set_result)


class ModelWorker:
    """The one thread that runs the model, taking jobs from a bounded queue in batches."""

    def __init__(self, pipe: ImagenPipeline, config: ServerConfig) -> None:
        self.pipe, self.config = pipe, config
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=config.max_queue)
        self.progress: dict[str, dict[str, Any]] = {}
        self.batches_run = 0
        self._deferred: list[Job] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="imagen-model", daemon=True)

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._lock:
            if not self.thread.is_alive() and not self._stop.is_set():
                self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        self.start()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return False
        self.progress[job.client_id] = job.progress
        while len(self.progress) > 1000:  # keep the newest entries only
            self.progress.pop(next(iter(self.progress)))
        return True

    def pending(self) -> int:
        return self.jobs.qsize() + len(self._deferred)

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
                    job.finish(error=Cancelled())
                else:
                    batch.append(job)
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        prompts, seeds, owner = [], [], []
        for j in batch:
            j.progress.update(state="running", stage=0, step=0)
            for i in range(j.num_images):
                prompts.append(j.prompt)
                seeds.append(j.seed + i)
                owner.append(j)
        g, steps, sampler = batch[0].key
        stages = self.pipe.num_stages

        def progress(_start: int, stage: int, step: int, total: int) -> None:
            if all(j.cancelled.is_set() for j in batch):
                raise Cancelled()
            for j in batch:
                j.progress.update(stage=stage, step=step, steps=total, stages=stages)

        started = time.time()
        try:
            sampling = self.pipe.sampling_configs(steps, g, sampler)
            out = self.pipe.generate(prompts, seeds, sampling, len(prompts), progress=progress)
        except BaseException as e:  # every accepted request gets an answer, even on failure
            for j in batch:
                j.progress.update(state="failed")
                j.finish(error=e)
            return
        self.batches_run += 1
        elapsed = time.time() - started
        for j in batch:
            images = [img for img, o in zip(out.images, owner, strict=True) if o is j]
            j.progress.update(state="done")
            j.finish({"images": images, "batch_size": len(prompts), "seconds": elapsed})


def png_base64(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(
    pipe: ImagenPipeline, config: ServerConfig | None = None, model_name: str = ""
) -> Any:
    """The FastAPI application (the worker thread starts with the app)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field, create_model

    cfg = config or ServerConfig()
    worker = ModelWorker(pipe, cfg)
    defaults = pipe.cascade.stages[0].config.sampling

    GenerateRequest = create_model(  # noqa: N806 - a class, built from the configured limits
        "GenerateRequest",
        prompt=(
            str,
            Field(min_length=1, max_length=cfg.max_prompt_chars, description="text prompt"),
        ),
        num_images=(int, Field(1, ge=1, le=cfg.max_images)),
        guidance=(
            float,
            Field(defaults.guidance, ge=0.0, le=cfg.max_guidance, allow_inf_nan=False),
        ),
        steps=(int, Field(defaults.steps, ge=1, le=cfg.max_steps)),
        sampler=(Literal["ddpm", "ddim", "dpmpp"], defaults.sampler),
        seed=(
            int | None,
            Field(None, ge=0, le=2**62, description="seed of the first image; random if absent"),
        ),
        client_id=(
            str | None,
            Field(None, max_length=64, description="key for GET /v1/progress/{client_id}"),
        ),
    )

    class ImageOut(BaseModel):
        png_base64: str
        seed: int
        width: int
        height: int

    class GenerateResponse(BaseModel):
        prompt: str
        images: list[ImageOut]
        settings: dict[str, Any]
        batch_size: int
        seconds: float

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        yield
        worker.stop()

    app = FastAPI(
        title="imagen",
        version="1",
        lifespan=lifespan,
        description="Text-to-image generation with a cascaded diffusion model.",
    )
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        names = []
        for e in errors:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            names.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
        return JSONResponse(
            status_code=422,
            content={
                "detail": "; ".join(names),
                "errors": [{"loc": e.get("loc"), "msg": e.get("msg")} for e in errors],
            },
        )

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "queued": worker.pending(), "max_queue": cfg.max_queue}

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        stages = []
        for st in pipe.cascade.stages:
            c = st.config
            stages.append(
                {
                    "resolution": c.resolution,
                    "super_resolution": c.is_super_resolution,
                    "lowres_size": c.lowres_size,
                    "schedule": c.diffusion.schedule,
                    "target": c.diffusion.target,
                    "sampling": asdict(c.sampling),
                }
            )
        return {
            "name": model_name,
            "text_encoder": pipe.cascade.text_encoder.config(),
            "stages": stages,
            "limits": asdict(cfg),
        }

    @app.get("/v1/progress/{client_id}")
    def progress(client_id: str) -> dict[str, Any]:
        p = worker.progress.get(client_id)
        if p is None:
            raise HTTPException(404, f"no request with client_id {client_id!r}")
        return dict(p)

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={429: {"description": "queue full; retry after Retry-After seconds"}},
    )
    async def generate(req: GenerateRequest, request: Request) -> Any:  # type: ignore[valid-type]
        seed = (
            req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        )
        loop = asyncio.get_running_loop()
        job = Job(
            req.prompt,
            req.num_images,
            req.guidance,
            req.steps,
            req.sampler,
            seed,
            req.client_id or uuid.uuid4().hex,
            loop,
            loop.create_future(),
        )
        if not worker.submit(job):
            raise HTTPException(
                429,
                "the queue is full; retry later",
                headers={"Retry-After": str(cfg.retry_after_s)},
            )
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=0.25)
            if not job.future.done() and await request.is_disconnected():
                job.cancelled.set()  # the worker drops it, or abandons its batch
                return JSONResponse(status_code=499, content={"detail": "client disconnected"})
        try:
            result = job.future.result()
        except Cancelled:
            return JSONResponse(status_code=499, content={"detail": "client disconnected"})
        except Exception as e:  # noqa: BLE001 - reported to the client, not swallowed
            raise HTTPException(500, f"generation failed: {type(e).__name__}: {e}") from e
        images = [
            ImageOut(png_base64=png_base64(img), seed=seed + i, width=img.width, height=img.height)
            for i, img in enumerate(result["images"])
        ]
        return GenerateResponse(
            prompt=req.prompt,
            images=images,
            batch_size=result["batch_size"],
            seconds=round(result["seconds"], 3),
            settings={
                "guidance": req.guidance,
                "steps": req.steps,
                "sampler": req.sampler,
                "seed": seed,
                "num_images": req.num_images,
            },
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (
            resources.files("imagen").joinpath("server/web/index.html").read_text(encoding="utf-8")
        )

    return app


def serve(model: str | None, config: ServerConfig, device: str = "cpu") -> None:
    """Load the model and run the server until interrupted."""
    import uvicorn

    pipe = ImagenPipeline.from_pretrained(model, device)
    app = create_app(pipe, config, model or "bundled")
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}, reachable from other machines")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")

"""``imagen serve``: an HTTP API and a web page over the pipeline (FastAPI + uvicorn).

Requests go through a bounded queue to one model worker thread (:mod:`imagen.server.worker`).
The worker batches queued requests with the same settings into one forward pass, up to
``max_batch_images``. At most ``max_queue`` requests wait or run; more get 429 with
Retry-After; an accepted request is always answered; a request whose client has gone is
dropped before it reaches the model, and a running batch whose clients have all gone stops at
the next denoiser step (its progress callback returns False). Bodies over ``max_body_bytes``
get 413; unknown fields, blank prompts and values out of range get 422.
"""

import asyncio
import base64
import io
import json
import uuid
from dataclasses import asdict
from importlib import resources
from typing import Any

from imagen.diffusion.samplers import SAMPLERS, Cancelled
from imagen.pipeline import ImagenPipeline, SamplingOverrides, sampling_summary
from imagen.server.schema import (
    GenerateResponse,
    ImageOut,
    ServerConfig,
    decode_image,
    request_model,
)
from imagen.server.worker import Job, ModelWorker

__all__ = ["Cancelled", "Job", "ModelWorker", "ServerConfig", "create_app", "serve"]

DISCONNECTED = 499  # nginx's "client closed request"


def png_base64(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, whether it announces its
    length or not (the body is read, up to the limit, before the app sees it)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large(send)
        chunks, size, message = [], 0, await receive()
        while message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.too_large(send)
            if not message.get("more_body", False):
                break
            message = await receive()
        if message["type"] == "http.request":
            message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        pending = [message]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def too_large(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(
    pipe: ImagenPipeline, config: ServerConfig | None = None, model_name: str = ""
) -> Any:
    """The FastAPI application (the worker thread starts with the first request)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    cfg = config or ServerConfig()
    worker = ModelWorker(pipe, cfg)

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
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.state.worker = worker
    add_error_handlers(app)
    add_info_routes(app, pipe, cfg, model_name)
    add_generate_route(app, pipe, cfg)
    return app


def add_error_handlers(app: Any) -> None:
    """422 answers that name the fields: ``{"detail": "steps: ...; prompt: ..."}``."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        names = []
        for e in errors:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            names.append(f"{'.'.join(loc) or 'body'}: {msg}")
        return JSONResponse(
            status_code=422,
            content={
                "detail": "; ".join(names),
                "errors": [{"loc": e.get("loc"), "msg": e.get("msg")} for e in errors],
            },
        )


def add_info_routes(app: Any, pipe: ImagenPipeline, cfg: ServerConfig, model_name: str) -> None:
    """``/v1/health``, ``/v1/model``, ``/v1/progress/{client_id}`` and the page at ``/``."""
    from fastapi import HTTPException
    from fastapi.responses import HTMLResponse

    worker: ModelWorker = app.state.worker

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "queued": worker.pending(),
            "admitted": worker.admitted,
            "max_queue": cfg.max_queue,
        }

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
            "samplers": {name: s.help for name, s in SAMPLERS.items()},
            "limits": asdict(cfg),
        }

    @app.get("/v1/progress/{client_id}")
    def progress(client_id: str) -> dict[str, Any]:
        p = worker.progress.get(client_id)
        if p is None:
            raise HTTPException(404, f"no request with client_id {client_id!r}")
        return dict(p)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (
            resources.files("imagen").joinpath("server/web/index.html").read_text(encoding="utf-8")
        )


def make_job(req: Any, pipe: ImagenPipeline, loop: asyncio.AbstractEventLoop) -> Job:
    """The worker's job for a validated request."""
    seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    edit = None
    if req.init_image is not None:
        init = decode_image(req.init_image)
        mask = decode_image(req.mask, "L") if req.mask is not None else None
        edit = pipe.make_edit(init, req.strength, mask)
    return Job(
        req.prompt,
        req.num_images,
        SamplingOverrides(steps=req.steps, guidance=req.guidance, sampler=req.sampler),
        seed,
        req.client_id or uuid.uuid4().hex,
        loop,
        loop.create_future(),
        req.negative_prompt,
        edit,
    )


def response_for(req: Any, job: Job, result: dict[str, Any]) -> GenerateResponse:
    """The answer to a finished request: its PNGs and the settings they were made with."""
    images = [
        ImageOut(png_base64=png_base64(img), seed=job.seed + i, width=img.width, height=img.height)
        for i, img in enumerate(result["images"])
    ]
    settings = {
        "guidance": req.guidance,
        "steps": req.steps,
        "sampler": req.sampler,
        "seed": job.seed,
        "num_images": req.num_images,
        "negative_prompt": req.negative_prompt,
        "stages": sampling_summary(result["sampling"]),
    }
    if req.init_image is not None:
        settings.update(strength=req.strength, inpainting=req.mask is not None)
    return GenerateResponse(
        prompt=req.prompt,
        images=images,
        batch_size=result["batch_size"],
        seconds=round(result["seconds"], 3),
        settings=settings,
    )


def add_generate_route(app: Any, pipe: ImagenPipeline, cfg: ServerConfig) -> None:
    """``POST /v1/generate``: queue, wait (watching for a disconnect), answer."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse

    worker: ModelWorker = app.state.worker
    GenerateRequest = request_model(cfg, pipe.cascade.stages[0].config.sampling)  # noqa: N806
    gone = {"status_code": DISCONNECTED, "content": {"detail": "client disconnected"}}

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={
            413: {"description": f"request body over {cfg.max_body_bytes} bytes"},
            429: {"description": "queue full; retry after Retry-After seconds"},
        },
    )
    async def generate(req: GenerateRequest, request: Request) -> Any:  # type: ignore[valid-type]
        job = make_job(req, pipe, asyncio.get_running_loop())
        if not worker.submit(job):
            raise HTTPException(
                429,
                "the queue is full; retry later",
                headers={"Retry-After": str(cfg.retry_after_s)},
            )
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=0.25)
            if not job.future.done() and await request.is_disconnected():
                job.cancelled.set()  # the worker drops it, or stops its batch
                return JSONResponse(**gone)
        try:
            result = job.future.result()
        except Cancelled:
            return JSONResponse(**gone)
        except Exception as e:  # noqa: BLE001 - reported to the client, not swallowed
            raise HTTPException(500, f"generation failed: {type(e).__name__}: {e}") from e
        return response_for(req, job, result)


def serve(model: str | None, config: ServerConfig, device: str = "cpu") -> None:
    """Load the model (a directory, a Hub repo id, or the bundled one) and serve it until
    interrupted."""
    import uvicorn

    pipe = ImagenPipeline.from_pretrained(model, device)
    app = create_app(pipe, config, model or "bundled")
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {config.host}, reachable from other machines")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")

"""``imagen serve``: an HTTP API and a web page over the pipeline (FastAPI + uvicorn).

Requests go through a bounded queue to one model worker thread (:mod:`imagen.server.worker`).
The worker batches queued requests with the same settings into one forward pass, up to
``max_batch_images``. At most ``max_queue`` requests wait or run; more get 429 with
Retry-After; an accepted request is always answered; a request whose client has gone is
dropped before it reaches the model, and a running batch whose clients have all gone stops at
the next denoiser step (its progress callback returns False). Bodies over ``max_body_bytes``
get 413; unknown fields, blank prompts and values out of range get 422. A setting a request
leaves out takes each stage's stored default, as on the command line.

The OpenAI Images API (:mod:`imagen.server.openai_api`) runs on the same worker and limits.
A Host header outside the allow-list gets 421, and with API keys every route but the page and
``/v1/health`` needs ``Authorization: Bearer KEY`` (:mod:`imagen.server.auth`).
"""

import asyncio
import base64
import io
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from importlib import resources
from typing import Any

from imagen.diffusion.samplers import SAMPLERS, Cancelled
from imagen.pipeline import ImagenPipeline, SamplingOverrides, sampling_summary
from imagen.server.auth import ApiKeys, HostAllowList, allowed_hosts
from imagen.server.errors import (
    DISCONNECTED,
    OpenAIError,
    describe_errors,
    is_openai_path,
    openai_error,
    send_error,
)
from imagen.server.openai_api import add_openai_routes, model_id
from imagen.server.schema import (
    LOOPBACK,
    GenerateResponse,
    ImageOut,
    ServerConfig,
    b64_upload,
    decode_upload,
    request_model,
)
from imagen.server.worker import ClientGone, Job, ModelWorker, QueueFull, random_seed

__all__ = ["Cancelled", "Job", "ModelWorker", "ServerConfig", "create_app", "serve"]


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
            return await self.too_large(scope, send)
        chunks, size, message = [], 0, await receive()
        while message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.too_large(scope, send)
            if not message.get("more_body", False):
                break
            message = await receive()
        if message["type"] == "http.request":
            message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        pending = [message]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def too_large(self, scope: dict, send: Any) -> None:
        message = f"request body over {self.max_bytes} bytes"
        await send_error(send, scope["path"], 413, message, "request_too_large")


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
    if cfg.api_keys:  # checked before the body is read
        app.add_middleware(ApiKeys, keys=cfg.api_keys)
    app.add_middleware(HostAllowList, allowed=allowed_hosts(cfg.host, cfg.allowed_hosts))
    app.state.worker = worker
    add_error_handlers(app)
    add_info_routes(app, pipe, cfg, model_name)
    add_generate_route(app, pipe, cfg)
    add_openai_routes(app, pipe, cfg, model_name)
    return app


def add_error_handlers(app: Any) -> None:
    """422 answers that name the fields: ``{"detail": "steps: ...; prompt: ..."}``; on the
    OpenAI routes, 400 (or the error's status) in OpenAI's shape."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(OpenAIError)
    async def openai_failed(_request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.content(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if is_openai_path(request.url.path):
            body = openai_error(exc.status_code, str(exc.detail))
        else:
            body = {"detail": exc.detail}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = describe_errors(errors)
        if is_openai_path(request.url.path):
            return JSONResponse(openai_error(400, message, param), status_code=400)
        return JSONResponse(
            status_code=422,
            content={
                "detail": message,
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
            "text_encoder": pipe.cascade.encoder_record(),
            "stages": stages,
            "loras": pipe.loras,
            "samplers": {name: s.help for name, s in SAMPLERS.items()},
            "limits": cfg.limits(),
            "api_keys": bool(cfg.api_keys),
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


def edit_for(req: Any, cfg: ServerConfig) -> Any:
    """The image-to-image or inpainting input of a validated request, decoded (slow for large
    images: the routes run it off the event loop)."""
    if req.init_image is None:
        return None
    init = decode_upload(
        b64_upload(req.init_image, cfg.max_image_side, "init_image"), what="init_image"
    )
    mask = None
    if req.mask is not None:
        mask = decode_upload(b64_upload(req.mask, cfg.max_image_side, "mask"), "L", "mask")
    return ImagenPipeline.make_edit(init, req.strength, mask)


def make_job(req: Any, loop: asyncio.AbstractEventLoop, edit: Any = None) -> Job:
    """The worker's job for a validated request (settings it leaves out stay None: each stage
    then runs with its own default)."""
    return Job(
        req.prompt,
        req.num_images,
        SamplingOverrides(steps=req.steps, guidance=req.guidance, sampler=req.sampler),
        req.seed if req.seed is not None else random_seed(),
        req.client_id or uuid.uuid4().hex,
        loop,
        loop.create_future(),
        req.negative_prompt,
        edit,
    )


def response_for(req: Any, job: Job, result: dict[str, Any]) -> GenerateResponse:
    """The answer to a finished request: its PNGs and the settings they were made with (as
    asked, None where left out, and per stage as run)."""
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
        warnings=result.get("warnings", []),
    )


def add_generate_route(app: Any, pipe: ImagenPipeline, cfg: ServerConfig) -> None:
    """``POST /v1/generate``: queue, wait (watching for a disconnect), answer."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse

    worker: ModelWorker = app.state.worker
    defaults = [st.config.sampling for st in pipe.cascade.stages]
    GenerateRequest = request_model(cfg, defaults)  # noqa: N806
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
        try:
            edit = await asyncio.to_thread(edit_for, req, cfg)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        job = make_job(req, asyncio.get_running_loop(), edit)
        try:
            result = await worker.run(job, request.is_disconnected)
        except QueueFull:
            raise HTTPException(
                429,
                "the queue is full; retry later",
                headers={"Retry-After": str(cfg.retry_after_s)},
            ) from None
        except ClientGone:
            return JSONResponse(**gone)
        except Exception as e:  # noqa: BLE001 - reported to the client, not swallowed
            raise HTTPException(500, f"generation failed: {type(e).__name__}: {e}") from e
        return response_for(req, job, result)


def serve(
    model: str | None,
    config: ServerConfig,
    device: str = "cpu",
    lora: Sequence[str] = (),
    fuse_lora: bool = False,
) -> None:
    """Load the model (a directory, a Hub repo id, or the bundled one), with LoRA files
    ``lora`` (``PATH[:SCALE][@STAGE]``) applied, and serve it until interrupted."""
    import uvicorn

    pipe = ImagenPipeline.from_pretrained(model, device, lora=lora, fuse_lora=fuse_lora)
    app = create_app(pipe, config, model or "bundled")
    if config.host not in LOOPBACK and not config.api_keys:
        print(
            f"warning: listening on {config.host} without API keys: anyone who can reach this "
            "machine can use it (set --api-key or IMAGEN_API_KEY)"
        )
    if config.host not in LOOPBACK:
        names = ", ".join(allowed_hosts(config.host, config.allowed_hosts))
        print(f"answering the Host names {names}; others get 421 (add them with --allowed-host)")
    print(f"OpenAI-compatible API at /v1 (model id {model_id(model or 'bundled')!r})")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")

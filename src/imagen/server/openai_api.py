"""The OpenAI Images API on the server (``/v1/images/generations``, ``/v1/images/edits``,
``/v1/images/variations``, ``/v1/models``): the same worker, queue, limits and settings model
as ``POST /v1/generate``, errors in OpenAI's shape. What each parameter maps to is in
:mod:`imagen.server.openai_schema`.

Edits follow OpenAI's mask convention: the mask's transparent pixels are regenerated
(inpainting); without a mask, an image with transparent pixels is inpainted there and an
opaque one is the start of image-to-image. Variations are image-to-image with the model's
empty caption. Uploads are checked from their headers before anything is decoded, and decoded
off the event loop.
"""

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ValidationError

from imagen.pipeline import ImagenPipeline, SamplingOverrides
from imagen.server.errors import DISCONNECTED, OpenAIError, describe_errors
from imagen.server.multipart import Form, parse_form
from imagen.server.openai_schema import (
    FORMATS,
    ImageStore,
    created,
    encode,
    image_entry,
    image_models,
    stages_for_size,
    steps_for_quality,
)
from imagen.server.schema import ServerConfig, decode_upload, open_upload
from imagen.server.worker import ClientGone, Job, ModelWorker, QueueFull, random_seed


@dataclass
class Route:
    """What the OpenAI routes share: the pipeline, limits, worker, model id and URL store."""

    pipe: ImagenPipeline
    cfg: ServerConfig
    worker: ModelWorker
    model_id: str
    store: ImageStore
    started: int

    @property
    def resolutions(self) -> list[int]:
        return [st.config.resolution for st in self.pipe.cascade.stages]

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_id):
            raise OpenAIError(
                404,
                f"model {name[:100]!r} is not served here; GET /v1/models lists {self.model_id!r}",
                "model",
                "model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.started,
            "owned_by": "imagen",
        }


def validated(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """``values`` checked by ``model``, or a 400 naming the fields."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        message, param = describe_errors(e.errors())
        raise OpenAIError(400, message, param) from None


def only_files(form: Form, names: tuple[str, ...]) -> None:
    """A 400 for a file part the route does not take (as for an unknown text field)."""
    for part in form.files:
        if part.removesuffix("[]") not in names:
            takes = " and ".join(names)
            raise OpenAIError(400, f"{part}: unknown file part (this route takes {takes})", part)


def the_file(form: Form, name: str, required: bool) -> bytes | None:
    """The one upload named ``name`` (or ``name[]``, as the SDK sends lists)."""
    files = form.files.get(name, []) + form.files.get(f"{name}[]", [])
    if name in form.fields or f"{name}[]" in form.fields:
        raise OpenAIError(400, f"{name} must be an uploaded file", name)
    if not files:
        if required:
            raise OpenAIError(400, f"{name}: an image file is required", name)
        return None
    if len(files) > 1:
        raise OpenAIError(400, f"{name}: one image only, got {len(files)}", name)
    return files[0]


def read_images(
    image: bytes, mask: bytes | None, strength: float | None, max_side: int
) -> tuple[Image.Image, Image.Image | None, float]:
    """The decoded image and (OpenAI's convention) mask as white = regenerate, and the
    strength; a ValueError naming the problem. Sizes come from the headers first."""
    head = open_upload(image, max_side, "image")
    w, h = head.size
    if w != h:
        raise ValueError(f"image: must be square, got {w}x{h}")
    mask_head = open_upload(mask, max_side, "mask") if mask is not None else None
    if mask_head is not None and mask_head.size != head.size:
        raise ValueError(
            f"mask: {mask_head.size[0]}x{mask_head.size[1]} is not the image's size {w}x{h}"
        )
    rgba = decode_upload(head, "RGBA", "image")
    alpha = rgba.getchannel("A")
    if mask_head is not None:
        if "A" not in mask_head.mode and "transparency" not in mask_head.info:
            raise ValueError("mask: needs an alpha channel (transparent pixels are regenerated)")
        alpha = decode_upload(mask_head, "RGBA", "mask").getchannel("A")
    regenerate = Image.eval(alpha, lambda a: 255 - a)
    # a mask always inpaints (an opaque one keeps everything); without one, an image with
    # (partly) transparent pixels is inpainted there, an opaque one is image-to-image
    inpaint = mask_head is not None or regenerate.getbbox() is not None
    init = decode_upload(head, "RGB", "image") if inpaint else rgba.convert("RGB")
    if strength is None:
        strength = 1.0 if inpaint else 0.7
    return init, regenerate if inpaint else None, strength


async def form_of(request: Any) -> Form:
    body = await request.body()
    try:
        return await asyncio.to_thread(parse_form, body, request.headers.get("content-type", ""))
    except ValueError as e:
        raise OpenAIError(400, str(e)) from None


async def run(route: Route, request: Any, req: Any, prompt: str, edit: Any = None) -> Any:
    """Queue the job of a validated OpenAI request, wait for it and answer it."""
    from fastapi.responses import JSONResponse

    route.check_model(req.model)
    stages = stages_or_400(req.size, route.resolutions)
    defaults = [st.config.sampling for st in route.pipe.cascade.stages[:stages]]
    steps = (
        req.steps
        if req.steps is not None
        else steps_for_quality(req.quality, defaults, route.cfg.max_steps)
    )
    loop = asyncio.get_running_loop()
    seed = req.seed if req.seed is not None else random_seed()
    job = Job(
        prompt,
        req.n or 1,
        SamplingOverrides(steps=steps, guidance=req.guidance),
        seed,
        uuid.uuid4().hex,
        loop,
        loop.create_future(),
        req.negative_prompt,
        edit,
        0 if stages == len(route.resolutions) else stages,  # the whole cascade, as /v1/generate
    )
    try:
        result = await route.worker.run(job, request.is_disconnected)
    except QueueFull:
        retry = {"Retry-After": str(route.cfg.retry_after_s)}
        raise OpenAIError(
            429, "the queue is full; retry later", None, "rate_limit_exceeded", retry
        ) from None
    except ClientGone:
        return JSONResponse({"detail": "client disconnected"}, status_code=DISCONNECTED)
    except Exception as e:  # noqa: BLE001 - reported to the client, not swallowed
        raise OpenAIError(500, f"generation failed: {type(e).__name__}: {e}") from e
    return answer(route, request, req, job, result["images"])


def answer(route: Route, request: Any, req: Any, job: Job, images: list[Any]) -> dict[str, Any]:
    """OpenAI's ImagesResponse for finished images."""
    fmt = req.output_format or "png"
    data = []
    for i, img in enumerate(images):
        raw = encode(img, fmt, req.output_compression)
        url = None
        if req.response_format == "url":
            name = route.store.put(raw, FORMATS[fmt][1], fmt)
            url = str(request.url_for("image_file", name=name))
        data.append(image_entry(raw, url, job.seed + i))
    side = images[0].width if images else 0
    out: dict[str, Any] = {
        "created": created(),
        "data": data,
        "background": "opaque",
        "output_format": fmt,
        "size": f"{side}x{side}",
    }
    if req.quality in ("low", "medium", "high", "xhigh", "max"):
        out["quality"] = req.quality
    return out


def multipart_body(model: type[BaseModel], files: dict[str, bool]) -> dict[str, Any]:
    """The OpenAPI request body of a multipart route: the model's fields and the files."""
    schema = model.model_json_schema()
    props = dict(schema.get("properties", {}))
    for name in files:
        props[name] = {"type": "string", "format": "binary"}
    required = list(schema.get("required", [])) + [n for n, req in files.items() if req]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": props, "required": required}
                }
            },
        }
    }


def model_id(model_name: str) -> str:
    """The id the OpenAI routes list and take as ``model``: "imagen" for the bundled model,
    else "imagen-" and the model directory's (or Hub repo's) name."""
    name = model_name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return "imagen" if name in ("", "bundled") else f"imagen-{name}"


ERRORS = {
    400: {"description": "a parameter is invalid (OpenAI's error shape)"},
    401: {"description": "a missing or wrong API key"},
    404: {"description": "an unknown model"},
    413: {"description": "the request body is over the limit"},
    429: {"description": "the queue is full; retry after Retry-After seconds"},
}


def add_openai_routes(app: Any, pipe: ImagenPipeline, cfg: ServerConfig, model_name: str) -> None:
    """The OpenAI Images API routes on ``app`` (whose worker runs them)."""
    from fastapi import Request
    from fastapi.responses import Response

    store = ImageStore(cfg.url_ttl_s, cfg.max_stored_bytes)
    route = Route(pipe, cfg, app.state.worker, model_id(model_name), store, created())
    defaults = [st.config.sampling for st in pipe.cascade.stages]
    models = image_models(cfg, defaults, route.resolutions)
    Generation = models["generations"]  # noqa: N806

    async def from_upload(request: Any, kind: str) -> tuple[Any, Any]:
        """The validated fields and the decoded edit of an edits or variations form."""
        form = await form_of(request)
        only_files(form, ("image", "mask") if kind == "edits" else ("image",))
        image = the_file(form, "image", True)
        mask = the_file(form, "mask", False) if kind == "edits" else None
        req = validated(models[kind], form.fields)
        route.check_model(req.model)
        stages_or_400(req.size, route.resolutions)
        assert image is not None

        def decode() -> Any:
            init, regenerate, strength = read_images(image, mask, req.strength, cfg.max_image_side)
            return ImagenPipeline.make_edit(init, strength, regenerate)

        try:
            return req, await asyncio.to_thread(decode)
        except ValueError as e:
            raise OpenAIError(400, str(e), str(e).partition(":")[0]) from None

    @app.post("/v1/images/generations", responses=ERRORS)
    async def images_generations(req: Generation, request: Request) -> Any:  # type: ignore[valid-type]
        return await run(route, request, req, req.prompt)

    @app.post(
        "/v1/images/edits",
        responses=ERRORS,
        openapi_extra=multipart_body(models["edits"], {"image": True, "mask": False}),
    )
    async def images_edits(request: Request) -> Any:
        req, edit = await from_upload(request, "edits")
        return await run(route, request, req, req.prompt, edit)

    @app.post(
        "/v1/images/variations",
        responses=ERRORS,
        openapi_extra=multipart_body(models["variations"], {"image": True}),
    )
    async def images_variations(request: Request) -> Any:
        req, edit = await from_upload(request, "variations")
        return await run(route, request, req, "", edit)  # the model's empty caption

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [route.model_card()]}

    @app.get("/v1/models/{model}", responses={404: ERRORS[404]})
    def get_model(model: str) -> dict[str, Any]:
        route.check_model(model or "?")
        return route.model_card()

    @app.get("/v1/images/files/{name}", name="image_file", responses={404: ERRORS[404]})
    async def image_file(name: str) -> Response:  # on the event loop, as the store wants
        item = store.get(name)
        if item is None:
            raise OpenAIError(404, "no such image, or it has expired", "name", "not_found")
        data, media_type, left = item
        headers = {"Cache-Control": f"private, max-age={max(0, int(left))}"}
        return Response(data, media_type=media_type, headers=headers)


def stages_or_400(size: str | None, resolutions: list[int]) -> int:
    try:
        return stages_for_size(size, resolutions)
    except ValueError as e:
        raise OpenAIError(400, str(e), "size") from None

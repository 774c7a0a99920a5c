"""Untrusted input, third round (issue 36): what the server's routes do with bad requests.
Two Authorization headers, a file part a route does not take, image errors that say what was
wrong and where, and a client that leaves mid-generation (no traceback in the log)."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import threading
import time

import pytest
from PIL import Image
from test_server import client_for, png_claiming, quick_pipe

KEY = "k-0123456789"
AUTH = ("Authorization", f"Bearer {KEY}")


@pytest.fixture(scope="module")
def pipe():
    return quick_pipe()


def png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_two_authorization_headers_are_refused(pipe):
    with client_for(pipe, api_keys=(KEY,)) as c:
        for second in (AUTH, ("Authorization", "Bearer wrong-key-123")):
            r = c.get("/v1/models", headers=[AUTH, second])
            assert r.status_code == 400, r.text
            assert "2 Authorization headers" in r.json()["error"]["message"]
        assert c.get("/v1/models", headers=[AUTH]).status_code == 200


def test_two_host_headers_are_refused():
    """(An HTTP client sends one Host header; the middleware is driven directly.)"""
    from imagen.server.auth import HostAllowList

    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def send(message):
        sent.append(message)

    guard = HostAllowList(app, ("localhost",))
    headers = [(b"host", b"localhost"), (b"host", b"evil.example")]
    asyncio.run(guard({"type": "http", "path": "/v1/model", "headers": headers}, None, send))
    assert reached == [] and sent[0]["status"] == 400 and b"two Host headers" in sent[1]["body"]


def test_a_file_part_the_route_does_not_take_is_400(pipe):
    image = ("a.png", png(Image.new("RGB", (16, 16), (200, 0, 0))), "image/png")
    with client_for(pipe, api_keys=(KEY,)) as c:
        post = dict(headers=[AUTH], data={"size": "16x16"})
        r = c.post("/v1/images/variations", files={"image": image, "mask": image}, **post)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "mask" and "unknown file part" in err["message"]
        r = c.post("/v1/images/edits", files={"image": image, "extra": image}, **post)
        assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
        r = c.post("/v1/images/variations", files={"image": image}, **post)
        assert r.status_code == 200, r.text


def test_image_errors_say_what_was_wrong_and_where(pipe):
    bomb = png_claiming(20000, 20000)  # over Pillow's own limit: refused as it opens
    cut = png(Image.new("RGB", (64, 64), (10, 200, 30)))
    cut = cut[: len(cut) // 2] + cut[-12:]  # an IEND, half the pixels
    with client_for(pipe, api_keys=(KEY,)) as c:
        r = c.post(
            "/v1/images/edits",
            files={"image": ("b.png", bomb, "image/png")},
            data={"prompt": "x"},
            headers=[AUTH],
        )
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "image", err
        assert "too many pixels" in err["message"] and "not a PNG" not in err["message"]
        for field, data in (("init_image", cut), ("init_image", bomb)):
            body = {"prompt": "x", field: base64.b64encode(data).decode()}
            r = c.post("/v1/generate", json=body, headers=[AUTH])
            assert r.status_code == 422, r.text
            assert r.json()["detail"].startswith(f"{field}: "), r.json()
        assert (
            "truncated"
            in c.post(
                "/v1/generate",
                json={"prompt": "x", "init_image": base64.b64encode(cut).decode()},
                headers=[AUTH],
            ).json()["detail"]
        )


def test_a_client_that_leaves_mid_generation_leaves_no_traceback(pipe, monkeypatch):
    from imagen.pipeline import SamplingOverrides
    from imagen.server.app import Cancelled, Job, ModelWorker, ServerConfig
    from imagen.server.worker import ClientGone

    running = threading.Event()

    def generate(*args, **kwargs):  # runs until its progress callback says stop
        running.set()
        while kwargs["progress"](_Progress()) is not False:
            time.sleep(0.01)
        raise Cancelled("every client has gone")

    monkeypatch.setattr(pipe, "generate", generate)
    worker = ModelWorker(pipe, ServerConfig())
    logged = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: logged.append(context))
        job = Job("x", 1, SamplingOverrides(steps=1), 0, "c1", loop, loop.create_future())

        async def gone() -> bool:
            return running.is_set()

        with pytest.raises(ClientGone):
            await worker.run(job, gone)
        for _ in range(500):  # the worker stops the batch and answers the job
            if job.future.done():
                break
            await asyncio.sleep(0.01)
        assert job.future.done()

    asyncio.run(scenario())
    worker.stop()
    worker.thread.join(5)  # its last job (and the job's future) go with it
    gc.collect()
    assert logged == [], logged  # asyncio logs a future's unretrieved exception when it goes


class _Progress:
    stage, step, steps, stages, fraction = 0, 0, 1, 1, 0.0

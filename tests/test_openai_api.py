"""The OpenAI Images API of ``imagen serve``, driven by the official ``openai`` SDK against a
uvicorn server on 127.0.0.1 (one per module, with an API key), plus plain-HTTP edge cases."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from test_server import (
    blocked,
    decodes_on_the_loop,
    free_port,
    png_claiming,
    quick_pipe,
    wait_for,
)

from imagen.server.app import ServerConfig, create_app

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
MODEL = "imagen-tiny"


@pytest.fixture(scope="module")
def pipe():
    return quick_pipe()


@pytest.fixture(scope="module")
def server(pipe):
    """The base URL of a server with one API key and a queue of two."""
    import uvicorn

    cfg = ServerConfig(max_queue=2, max_images=2, max_steps=4, api_keys=(KEY,), url_ttl_s=60)
    port = free_port()
    app = create_app(pipe, cfg, "tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def decoded(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def noise(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_generate_two_images_as_base64_and_as_urls(client, server):
    out = client.images.generate(
        model=MODEL, prompt="a red circle", n=2, size="64x64", extra_body={"seed": 7}
    )
    assert len(out.data) == 2 and out.size == "64x64" and out.output_format == "png"
    first, second = (decoded(d.b64_json) for d in out.data)
    assert first.size == second.size == (64, 64) and first.tobytes() != second.tobytes()
    by_url = client.images.generate(
        prompt="a red circle", n=1, response_format="url", extra_body={"seed": 7}
    )
    url = by_url.data[0].url
    assert url.startswith(server[0] + "/v1/images/files/")
    assert httpx.get(url).status_code == 401  # the key guards served images too
    got = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(got.content)).tobytes() == first.tobytes()  # seed 7 again
    small = client.images.generate(prompt="a red circle", size="16x16", output_format="jpeg")
    assert decoded(small.data[0].b64_json).size == (16, 16) and small.output_format == "jpeg"


def test_edit_with_a_mask_keeps_the_opaque_pixels(client):
    init = noise()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = regenerate
    out = client.images.edit(
        image=("init.png", png(init), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a blue square",
        size="64x64",
        extra_body={"seed": 1},
    )
    got = np.asarray(decoded(out.data[0].b64_json).convert("RGB")).astype(int)
    want = np.asarray(init).astype(int)
    keep = np.asarray(mask)[..., 3] == 255
    assert np.abs(got[keep] - want[keep]).max() <= 1
    assert np.abs(got[~keep] - want[~keep]).mean() > 5


def test_variations_and_models(client):
    out = client.images.create_variation(image=("a.png", png(noise()), "image/png"), n=2)
    assert [decoded(d.b64_json).size for d in out.data] == [(64, 64)] * 2
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "imagen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.images.generate(model="dall-e-3", prompt="x")


def test_a_wrong_or_missing_key_is_refused_everywhere_but_health_and_the_page(server):
    base, app = server
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.images.generate(prompt="x")
    assert e.value.body["code"] == "invalid_api_key" and "not-the-key" not in str(e.value)
    routes = [(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops]
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")]
    assert len(routes) > 10
    with httpx.Client(base_url=base) as http:
        for method, path in routes:
            url = path.replace("{", "").replace("}", "")  # any value for path parameters
            for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": KEY}):
                r = http.request(method, url, headers=headers)
                assert r.status_code == (200 if path == "/v1/health" else 401), (method, path)
    r = httpx.post(base + "/v1/generate", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["detail"].startswith("missing API key")
    assert "<form" in httpx.get(base + "/").text


def test_bad_parameters_get_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="")
    body = e.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="makes 16x16, 32x32, 64x64"):
        client.images.generate(prompt="x", size="1024x1024")
    with pytest.raises(openai.BadRequestError, match="n: "):
        client.images.generate(prompt="x", n=3)
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        client.images.generate(prompt="x", extra_body={"negative_promt": "typo"})
    with pytest.raises(openai.BadRequestError, match="opaque"):
        client.images.generate(prompt="x", background="transparent")


def test_a_full_queue_is_a_rate_limit_error(client, server, pipe, monkeypatch):
    gate, calls = blocked(pipe, monkeypatch)
    worker = server[1].state.worker
    with ThreadPoolExecutor(2) as ex:
        held = [ex.submit(client.images.generate, prompt=f"p{i}", size="64x64") for i in range(2)]
        wait_for(lambda: worker.admitted == 2)
        try:
            with pytest.raises(openai.RateLimitError) as e:
                client.images.generate(prompt="one too many")
            assert e.value.response.headers["retry-after"] == "2"
            assert e.value.body["code"] == "rate_limit_exceeded"
        finally:
            gate.set()
        assert all(len(f.result().data) == 1 for f in held)


def form_post(base, files, data=None):
    return httpx.post(
        base + "/v1/images/edits",
        files=files,
        data={"prompt": "x", **(data or {})},
        headers={"Authorization": f"Bearer {KEY}"},
    )


def test_multipart_edge_cases(server):
    base = server[0]
    image = ("a.png", png(noise()), "image/png")
    opaque_mask = ("m.png", png(Image.new("L", (64, 64), 0)), "image/png")
    small_mask = ("m.png", png(Image.new("RGBA", (32, 32))), "image/png")
    cases = [
        ({"mask": small_mask}, {}, "image", "image: an image file is required"),
        ({"image": image, "mask": small_mask}, {}, "mask", "32x32 is not the image's size 64x64"),
        ({"image": image, "mask": opaque_mask}, {}, "mask", "needs an alpha channel"),
        ({"image": ("a.txt", b"just text", "text/plain")}, {}, "image", "image: not a PNG"),
        (
            {"image": ("a.png", png(noise(64)).replace(b"IDAT", b"IDAX"), "image/png")},
            {},
            "image",
            "",
        ),
        ({"image": ("a.png", png(Image.new("RGB", (64, 32))), "image/png")}, {}, "image", "square"),
        ({"image": image}, {"strength": "2"}, "strength", "less than or equal to 1"),
        ({"image": image}, {"n": "many"}, "n", "integer"),
    ]
    for files, data, param, words in cases:
        r = form_post(base, files, data)
        assert r.status_code == 400, (param, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
    r = httpx.post(
        base + "/v1/images/edits",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_a_header_claiming_a_huge_image_is_refused_before_any_decoding(server):
    bomb = png_claiming(12000, 12000)
    started = time.monotonic()
    r = form_post(server[0], {"image": ("bomb.png", bomb, "image/png")})
    assert (
        r.status_code == 400 and "12000 px is larger than 1024 px" in r.json()["error"]["message"]
    )
    assert time.monotonic() - started < 5


def test_uploads_are_decoded_off_the_event_loop(server, monkeypatch):
    import imagen.server.openai_api as api

    on_loop = decodes_on_the_loop(monkeypatch, api)
    r = form_post(server[0], {"image": ("a.png", png(noise()), "image/png")}, {"size": "16x16"})
    assert r.status_code == 200, r.text
    assert on_loop and not any(on_loop)


def test_foreign_host_headers_are_refused(server):
    base, port = server[0], server[0].rsplit(":", 1)[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(base + "/v1/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        r = httpx.get(base + "/v1/models", headers={**auth, "Host": host})
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", host


def test_quality_steps_and_url_expiry():
    from imagen.models.sampling import SamplingConfig
    from imagen.server.openai_schema import ImageStore, steps_for_quality

    defaults = [SamplingConfig(steps=8), SamplingConfig(steps=6), SamplingConfig(steps=4)]
    assert steps_for_quality(None, defaults, 100) is None  # each stage's default
    assert steps_for_quality("medium", defaults, 100) is None
    assert steps_for_quality("low", defaults, 100) == (4, 3, 2)
    assert steps_for_quality("high", defaults, 100) == (12, 9, 6)
    assert steps_for_quality("max", defaults, 10) == (10, 10, 8)
    store = ImageStore(ttl_s=60, max_bytes=10)
    a = store.put(b"123456", "image/png", "png")
    assert store.get(a)[0] == b"123456"
    b = store.put(b"7890123", "image/png", "png")  # over 10 bytes: the oldest goes
    assert store.get(a) is None and store.get(b)[0] == b"7890123" and a != b
    expired = ImageStore(ttl_s=0, max_bytes=100)
    assert expired.get(expired.put(b"x", "image/png", "png")) is None


def test_a_body_over_the_limit_is_413_in_openais_shape(pipe):
    from fastapi.testclient import TestClient

    app = create_app(pipe, ServerConfig(max_body_bytes=2000), "tiny")
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/v1/images/generations", json={"prompt": "x" * 3000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/images/edits", files={"image": ("a.png", b"x" * 3000, "image/png")})
        assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
        r = c.get("/v1/images/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"

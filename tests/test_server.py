import base64
import collections
import contextlib
import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_cascade import make_cascade

from imagen.pipeline import ImagenPipeline
from imagen.server.app import ServerConfig, create_app


@pytest.fixture(scope="module")
def pipe():
    return ImagenPipeline(make_cascade())


def quick_pipe():
    """The tiny cascade with per-stage defaults that differ (steps 2/1/1, guidance 3/1/1), as
    the bundled model's do (8/6/4, 3/1/1): fast, and a stage-0-for-all bug shows."""
    cascade = make_cascade()
    for st, steps, guidance in zip(cascade.stages, (2, 1, 1), (3.0, 1.0, 1.0), strict=True):
        st.config.sampling = replace(st.config.sampling, steps=steps, guidance=guidance)
    return ImagenPipeline(cascade)


def png_b64(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_1PX = png_b64(Image.new("L", (1, 1), 255))


def client_for(pipe, **limits):
    cfg = ServerConfig(**{"max_steps": 6, "max_images": 3, **limits})
    return TestClient(create_app(pipe, cfg, "tiny"), base_url="http://localhost")


def test_health_model_and_schema(pipe):
    with client_for(pipe) as c:
        assert c.get("/v1/health").json()["status"] == "ok"
        m = c.get("/v1/model").json()
        assert [s["resolution"] for s in m["stages"]] == [16, 32, 64] and m["text_encoder"][
            "name"
        ] == "hash-32"
        schema = c.get("/openapi.json").json()
        props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
        assert props["steps"]["maximum"] == 6 and props["num_images"]["maximum"] == 3
        assert "<form" in c.get("/").text


def test_generate_returns_pngs_with_seeds(pipe):
    with client_for(pipe) as c:
        body = {
            "prompt": "a red circle on the left",
            "num_images": 2,
            "steps": 2,
            "guidance": 2.0,
            "sampler": "ddim",
            "seed": 11,
        }
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert [im["seed"] for im in data["images"]] == [11, 12] and data["settings"][
            "sampler"
        ] == "ddim"
        img = Image.open(io.BytesIO(base64.b64decode(data["images"][0]["png_base64"])))
        assert img.size == (64, 64) == (data["images"][0]["width"], data["images"][0]["height"])
        again = c.post("/v1/generate", json=body).json()
        assert again["images"][1]["png_base64"] == data["images"][1]["png_base64"]
        assert (
            c.post("/v1/generate", json={"prompt": "x", "steps": 1}).json()["settings"]["seed"] >= 0
        )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "steps": 1000}, "steps"),
        ({"prompt": "x", "guidance": -1}, "guidance"),
        ({"prompt": "x", "num_images": 99}, "num_images"),
        ({"prompt": "x", "sampler": "euler"}, "sampler"),
        ({"prompt": "x" * 301}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"steps": 3}, "prompt"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": 3}, "prompt"),
    ],
)
def test_bad_requests_are_4xx_naming_the_field(pipe, body, field):
    with client_for(pipe) as c:
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "num_image": 2}, "num_image"),  # a typo is refused, not ignored
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "\n\t"}, "prompt"),
        ({"prompt": "x", "guidance": "nan"}, "guidance"),
        ({"prompt": "x", "init_image": "not base64!"}, "init_image"),
        ({"prompt": "x", "mask": PNG_1PX}, "mask"),
        ({"prompt": "x", "strength": 2}, "strength"),
        ({"prompt": "x", "negative_prompt": "n" * 301}, "negative_prompt"),
    ],
)
def test_unknown_fields_blank_prompts_and_bad_images_are_422(pipe, body, field):
    with client_for(pipe) as c:
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(field), r.text


def test_bodies_over_the_limit_are_413(pipe):
    with client_for(pipe, max_body_bytes=2000) as c:
        r = c.post("/v1/generate", json={"prompt": "x", "init_image": "A" * 3000})
        assert r.status_code == 413, r.text
        chunked = iter([b'{"prompt": "', b"x" * 1500, b"x" * 1500, b'"}'])  # no Content-Length
        r = c.post("/v1/generate", content=chunked, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "2000 bytes" in r.json()["detail"]
        assert c.post("/v1/generate", json={"prompt": "x", "steps": 1}).status_code == 200
        schema = c.get("/openapi.json").json()
        assert "413" in schema["paths"]["/v1/generate"]["post"]["responses"]


def test_images_larger_than_the_limit_are_422(pipe):
    buf = io.BytesIO()
    Image.new("RGB", (70, 20)).save(buf, "PNG")
    big = base64.b64encode(buf.getvalue()).decode()
    with client_for(pipe, max_image_side=64) as c:
        r = c.post("/v1/generate", json={"prompt": "x", "init_image": big})
        assert r.status_code == 422 and "70 px" in r.json()["detail"]


def test_the_queue_limit_counts_waiting_and_running_requests(pipe, monkeypatch):
    gate, calls = blocked(pipe, monkeypatch)
    with client_for(pipe, max_queue=16, max_batch_images=8, batch_wait_s=0.2) as c:

        def post(i):
            return c.post("/v1/generate", json={"prompt": f"p{i}", "steps": 1, "seed": i})

        with ThreadPoolExecutor(32) as ex:
            futures = [ex.submit(post, i) for i in range(16)]
            wait_for(lambda: c.app.state.worker.admitted == 16)
            extra = [ex.submit(post, i) for i in range(16, 24)]
            wait_for(lambda: all(f.done() for f in extra))
            assert [f.result().status_code for f in extra] == [429] * 8
            gate.set()
            assert [f.result().status_code for f in futures] == [200] * 16
    assert c.app.state.worker.admitted == 0


def test_negative_prompts_and_inpainting_through_the_api(pipe):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {"prompt": "a red circle", "steps": 2, "seed": 5}
    with client_for(pipe) as c:
        plain = c.post("/v1/generate", json=body).json()
        negative = c.post("/v1/generate", json={**body, "negative_prompt": "red"}).json()
        assert negative["settings"]["negative_prompt"] == "red"
        assert plain["images"][0]["png_base64"] != negative["images"][0]["png_base64"]
        edit = {**body, "init_image": png_b64(init), "mask": png_b64(mask), "strength": 1.0}
        r = c.post("/v1/generate", json=edit)
        assert r.status_code == 200, r.text
        assert r.json()["settings"]["inpainting"] is True
        assert [s["steps"] for s in r.json()["settings"]["stages"]] == [2, 2, 2]
    png = r.json()["images"][0]["png_base64"]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))).astype(int)
    keep = np.asarray(mask) == 0
    assert np.abs(got[keep] - np.asarray(init).astype(int)[keep]).max() <= 1


def test_malformed_json(pipe):
    with client_for(pipe) as c:
        r = c.post(
            "/v1/generate", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422 and "JSON" in r.json()["detail"]
        assert c.get("/v1/progress/nobody").status_code == 404


def blocked(pipe, monkeypatch):
    """Make generation wait on a gate, counting batches."""
    gate, calls = threading.Event(), []
    real = pipe.generate

    def slow(prompts, *args, **kwargs):
        calls.append(len(prompts))
        gate.wait(30)
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(pipe, "generate", slow)
    return gate, calls


def wait_for(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_queue_overflow_gets_429_and_accepted_requests_all_finish(pipe, monkeypatch):
    gate, calls = blocked(pipe, monkeypatch)
    with client_for(pipe, max_queue=3, max_batch_images=1) as c:

        def post(i):
            return c.post("/v1/generate", json={"prompt": f"p{i}", "steps": 1, "seed": i})

        with ThreadPoolExecutor(8) as ex:
            first = ex.submit(post, 0)
            while not calls:  # the worker holds the first request
                time.sleep(0.01)
            rest = [ex.submit(post, i) for i in range(1, 7)]
            wait_for(lambda: sum(f.done() for f in rest) == 4)  # the 429s come back at once
            gate.set()
            codes = [first.result().status_code] + [f.result().status_code for f in rest]
    assert codes.count(429) == 4 and codes.count(200) == 3  # 1 running + 2 queued, never lost
    assert c.get("/v1/health").status_code == 200


def test_compatible_requests_are_batched(pipe, monkeypatch):
    gate, calls = blocked(pipe, monkeypatch)
    with client_for(pipe, max_queue=8, max_batch_images=8, batch_wait_s=0.2) as c:

        def post(i, steps=2):
            return c.post("/v1/generate", json={"prompt": f"p{i}", "steps": steps, "seed": i})

        with ThreadPoolExecutor(8) as ex:
            first = ex.submit(post, 0)
            while not calls:
                time.sleep(0.01)
            same = [ex.submit(post, i) for i in range(1, 4)]
            wait_for(lambda: c.app.state.worker.pending() == 3)
            other = ex.submit(post, 9, 3)  # different steps: not batched with the others
            wait_for(lambda: c.app.state.worker.pending() == 4)
            gate.set()
            results = [f.result().json() for f in same]
            assert other.result().json()["batch_size"] == 1
    assert first.result().json()["batch_size"] == 1
    assert all(r["batch_size"] == 3 for r in results)
    assert sorted(calls) == [1, 1, 3]


def test_a_cancelled_request_never_reaches_the_model(pipe, monkeypatch):
    import asyncio

    from imagen.pipeline import SamplingOverrides
    from imagen.server.app import Cancelled, Job, ModelWorker

    calls = []
    monkeypatch.setattr(pipe, "generate", lambda *a, **k: calls.append(a))
    worker = ModelWorker(pipe, ServerConfig())
    loop = asyncio.new_event_loop()
    overrides = SamplingOverrides(guidance=1.0, steps=1, sampler="dpmpp")
    job = Job("x", 1, overrides, 0, "c1", loop, loop.create_future())
    job.cancelled.set()
    worker.submit(job)
    deadline = time.time() + 5
    while not job.future.done() and time.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.02))
    worker.stop()
    assert isinstance(job.future.exception(), Cancelled) and calls == []
    loop.close()


def test_schema_fuzz_finds_no_server_errors():
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    cfg = ServerConfig(
        max_steps=2, max_images=1, max_prompt_chars=40, allowed_hosts=("testserver",)
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(quick_pipe(), cfg, "tiny"))
    failures, calls, paths = [], [], collections.Counter()
    for op in schema.get_all_operations():
        operation = op.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":  # GET routes without inputs have nothing to negate
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(
                max_examples=30,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call()
                calls.append(response.status_code)
                paths[(case.path, response.status_code)] += 1
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.status_code))

            check()
    assert not failures
    for route in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations"):
        assert paths[(route, 400)] > 0, paths  # the OpenAI routes were fuzzed too
    assert len(calls) > 50 and 200 in calls and 422 in calls  # valid and invalid requests were sent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)"
)


@contextlib.contextmanager
def browser_page(app):
    """A headless Chromium page next to a uvicorn server running ``app``."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ],
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            yield page
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


@needs_chromium
def test_browser_types_a_prompt_and_sees_an_image(pipe):
    with browser_page(create_app(pipe, ServerConfig(), "tiny")) as page:
        page.fill("#prompt", "a red circle on the left")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_selector("#result img", timeout=30_000)
        assert page.locator("#gallery img").count() == 1
        assert "seed" in page.inner_text("#result")
        src = page.get_attribute("#result img", "src")
        assert src.startswith("data:image/png;base64,")


def decode_data_uri(src):
    return Image.open(io.BytesIO(base64.b64decode(src.partition(",")[2]))).convert("RGB")


@needs_chromium
def test_browser_inpaints_with_a_negative_prompt_and_reuses_a_seed(pipe, tmp_path, monkeypatch):
    real = pipe.generate

    def slowed(*args, progress=None, **kwargs):  # slow enough to watch the progress bar
        def step(p):
            time.sleep(0.03)
            return progress(p)

        return real(*args, progress=step if progress else None, **kwargs)

    monkeypatch.setattr(pipe, "generate", slowed)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    init.save(tmp_path / "init.png")
    with browser_page(create_app(pipe, ServerConfig(), "tiny")) as page:
        page.fill("#prompt", "a red circle")
        page.fill("#negative_prompt", "blue")
        page.fill("#steps", "6")
        page.fill("#strength", "1")
        page.set_input_files("#init_file", str(tmp_path / "init.png"))
        page.wait_for_selector("#canvas-wrap canvas", state="visible")
        page.select_option("#mask_tool", "rect")
        box = page.locator("#mask_canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.25)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.75, steps=4)
        page.mouse.up()
        with page.expect_request("**/v1/generate") as sent:
            page.click("#generate")
        body = sent.value.post_data_json
        assert body["negative_prompt"] == "blue" and body["strength"] == 1
        assert body["init_image"].startswith("data:image/png") and "mask" in body
        page.wait_for_function(
            "() => { const p = document.getElementById('progress');"
            " return !p.hidden && p.value > 0 && p.value < 1; }",
            timeout=30_000,
        )
        page.wait_for_selector("#result img", timeout=60_000)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        out = np.asarray(decode_data_uri(page.get_attribute("#result img", "src"))).astype(int)
        kept, redone = np.ones((64, 64), bool), np.zeros((64, 64), bool)
        kept[12:52, 12:52], redone[20:44, 20:44] = False, True
        want = np.asarray(init).astype(int)
        assert np.abs(out[kept] - want[kept]).max() <= 1  # outside the mask: the upload
        assert np.abs(out[redone] - want[redone]).mean() > 5  # inside: generated
        seed = int(page.get_attribute("#result img", "data-seed"))
        page.fill("#prompt", "something else")
        page.click("#result img")  # reuse this image's seed and settings
        assert page.input_value("#seed") == str(seed)
        assert page.input_value("#prompt") == "a red circle"
        assert page.input_value("#negative_prompt") == "blue"
        with page.expect_download() as download:
            page.click("#result a.download")
        assert download.value.suggested_filename == f"imagen-seed-{seed}.png"
        assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(tmp_path / "page.png").size[0] > 0


def png_claiming(width, height):
    """A PNG whose header claims width x height, with no pixel data (a bomb's header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_requests_without_settings_get_each_stages_defaults_as_on_the_command_line():
    from imagen.cli.common import checked_configs
    from imagen.cli.main import build_parser
    from imagen.pipeline import sampling_summary

    pipe = quick_pipe()
    cli = sampling_summary(checked_configs(pipe, build_parser().parse_args(["sample", "x"])))
    assert [s["steps"] for s in cli] == [2, 1, 1] and [s["guidance"] for s in cli] == [3, 1, 1]
    with TestClient(create_app(pipe, ServerConfig(), "tiny"), base_url="http://localhost") as c:
        r = c.post("/v1/generate", json={"prompt": "a red circle", "seed": 0})
        assert r.status_code == 200, r.text
        assert r.json()["settings"]["stages"] == cli and r.json()["settings"]["steps"] is None
        one = c.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 0}).json()
        assert [s["steps"] for s in one["settings"]["stages"]] == [1, 1, 1]
        assert [s["guidance"] for s in one["settings"]["stages"]] == [3, 1, 1]


def decodes_on_the_loop(monkeypatch, module):
    """Watch ``module.decode_upload``: the list gets, per call, whether it ran on an event loop."""
    import asyncio

    on_loop, real = [], module.decode_upload

    def watched(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "decode_upload", watched)
    return on_loop


def test_init_images_are_checked_from_the_header_and_decoded_off_the_event_loop(monkeypatch):
    import imagen.server.app as server_app

    on_loop = decodes_on_the_loop(monkeypatch, server_app)
    bomb = base64.b64encode(png_claiming(12000, 12000)).decode()
    with client_for(quick_pipe()) as c:
        started = time.monotonic()
        r = c.post("/v1/generate", json={"prompt": "x", "init_image": bomb})
        assert r.status_code == 422 and "12000 px is larger than 1024 px" in r.json()["detail"]
        assert time.monotonic() - started < 5 and on_loop == []  # refused before any decoding
        init = png_b64(Image.new("RGB", (64, 64), (200, 0, 0)))
        r = c.post("/v1/generate", json={"prompt": "x", "init_image": init, "mask": init})
        assert r.status_code == 200, r.text
    assert on_loop == [False, False]  # the image and the mask, both in a worker thread


def test_the_host_header_allow_list(pipe):
    from imagen.server.auth import allowed_hosts, host_allowed

    app = create_app(pipe, ServerConfig(), "tiny")
    with TestClient(app) as c:  # TestClient's Host is "testserver"
        r = c.get("/v1/health")
        assert r.status_code == 421 and "--allowed-host testserver" in r.json()["detail"]
        assert c.get("/v1/health", headers={"Host": "localhost:8000"}).status_code == 200
    allowed = create_app(pipe, ServerConfig(allowed_hosts=("testserver",)), "tiny")
    with TestClient(allowed) as c:
        assert c.get("/v1/health").status_code == 200
    lan = allowed_hosts("192.168.1.5", ("imagen.lan:8000",))
    assert host_allowed("192.168.1.5:8000", lan) and host_allowed("[::1]:1", lan)
    assert host_allowed("imagen.lan:8000", lan) and not host_allowed("imagen.lan:9000", lan)
    assert not host_allowed("evil.example", allowed_hosts("0.0.0.0"))
    assert host_allowed("anything", allowed_hosts("0.0.0.0", ("*",)))


def test_api_keys_guard_the_own_api_too(pipe, monkeypatch, capsys):
    with client_for(pipe, api_keys=("k-123456789",)) as c:
        assert c.post("/v1/generate", json={"prompt": "x", "steps": 1}).status_code == 401
        auth = {"Authorization": "Bearer k-123456789"}
        r = c.post("/v1/generate", json={"prompt": "x", "steps": 1}, headers=auth)
        assert r.status_code == 200, r.text
        assert c.get("/v1/health").status_code == 200 and c.get("/").status_code == 200
        info = c.get("/v1/model", headers=auth).json()
        assert info["api_keys"] is True and "k-123456789" not in str(info)
    import uvicorn

    from imagen.cli.common import UsageError
    from imagen.cli.main import build_parser
    from imagen.cli.serve import api_keys
    from imagen.pipeline import ImagenPipeline
    from imagen.server.app import serve

    monkeypatch.setenv("IMAGEN_API_KEY", "env-key-1234, env-key-5678")
    args = build_parser().parse_args(["serve", "--api-key", "cli-key-1234"])
    assert api_keys(args) == ("cli-key-1234", "env-key-1234", "env-key-5678")
    monkeypatch.setenv("IMAGEN_API_KEY", "ok-key-1234,")
    with pytest.raises(UsageError, match="empty"):
        api_keys(args)
    from imagen.cli.main import main

    monkeypatch.delenv("IMAGEN_API_KEY")
    capsys.readouterr()
    assert main(["serve", "--api-key", "short"]) == 2  # before any model loads
    assert main(["serve", "--allowed-host", " "]) == 2
    err = capsys.readouterr().err
    assert "8 printable characters" in err and "--allowed-host needs" in err and "short" not in err
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(ImagenPipeline, "from_pretrained", lambda *a, **k: pipe)
    serve(None, ServerConfig(host="0.0.0.0"))
    out = capsys.readouterr().out
    assert "without API keys" in out and "localhost, 127.0.0.1, [::1]; others get 421" in out
    serve(None, ServerConfig(host="0.0.0.0", api_keys=("k-123456789",)))
    assert "without API keys" not in capsys.readouterr().out


PAGE_STUB = r"""
const els = {};
function el(id) {
  if (!els[id]) els[id] = {id, value: "", hidden: false, placeholder: "", listeners: {}, style: {},
    children: [], files: [], addEventListener(t, f) { this.listeners[t] = f; }, focus() {},
    replaceChildren(...c) { this.children = c; }, prepend() {},
    getContext() { return {clearRect() {}, fillRect() {}, drawImage() {}}; }};
  return els[id];
}
el("keybox").hidden = true;
const store = {}, calls = [], out = {};
global.sessionStorage = {getItem: k => store[k] ?? null, setItem: (k, v) => { store[k] = v; },
  removeItem: k => { delete store[k]; }};
global.document = {getElementById: el, createElement: () => el("tmp" + Math.random())};
global.Option = function (text, value) { this.text = text; this.value = value; };
global.Image = function () {};
global.setInterval = () => 0; global.clearInterval = () => {};
const model = {limits: {max_image_side: 64}, samplers: {dpmpp: "", ddim: ""},
  stages: [{sampling: {steps: 8, guidance: 3, sampler: "dpmpp"}},
           {sampling: {steps: 6, guidance: 1, sampler: "dpmpp"}}]};
global.fetch = (path, opts) => {
  const auth = (opts.headers || {}).Authorization, ok = auth === "Bearer sekret-key";
  calls.push([path, auth || null, opts.body ? JSON.parse(opts.body) : null]);
  const data = path === "/v1/model" ? model : {images: [], settings: {seed: 1}, seconds: 0};
  return Promise.resolve({ok, status: ok ? 200 : 401, json: () => Promise.resolve(data)});
};
eval(PAGE);
const tick = () => new Promise(r => setTimeout(r, 10));
(async () => {
  await tick();
  out.asked = !els.keybox.hidden;
  els.api_key.value = "sekret-key";
  els.save_key.listeners.click();
  await tick();
  out.stored = store["imagen-api-key"];
  out.hidden_after = els.keybox.hidden;
  out.steps_placeholder = els.steps.placeholder;
  el("prompt").value = "a red circle"; el("num_images").value = "1";
  await els.form.listeners.submit({preventDefault() {}});
  out.calls = calls;
  console.log(JSON.stringify(out));
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_page_asks_for_the_key_once_and_leaves_settings_to_the_stages(tmp_path):
    """The page's script under node with a stub DOM and fetch (runs where Chromium does not)."""
    import json
    import subprocess

    html = (Path(__file__).parents[1] / "src/imagen/server/web/index.html").read_text()
    page = html[html.index("<script>") + 8 : html.index("</script>")]
    script = tmp_path / "page.js"
    script.write_text(f"const PAGE = {json.dumps(page)};\n{PAGE_STUB}")
    run = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["asked"] and out["stored"] == "sekret-key" and out["hidden_after"]
    assert out["steps_placeholder"] == "default 8/6"
    assert out["calls"][0] == ["/v1/model", None, None]  # 401: the page asks for the key
    assert out["calls"][1] == ["/v1/model", "Bearer sekret-key", None]
    path, auth, body = out["calls"][-1]
    assert path == "/v1/generate" and auth == "Bearer sekret-key"
    assert body.pop("client_id") and body == {"prompt": "a red circle", "num_images": 1}


def test_a_response_names_words_the_model_never_saw():
    pipe = ImagenPipeline(make_cascade(), vocabulary=["a", "red", "circle"])
    with client_for(pipe) as c:
        body = {"prompt": "a red dog", "steps": 1, "seed": 1}
        warned = c.post("/v1/generate", json=body).json()["warnings"]
        body["prompt"] = "a red circle"
        assert c.post("/v1/generate", json=body).json()["warnings"] == []
    assert len(warned) == 1 and "dog" in warned[0]


def test_a_batched_response_names_only_its_own_prompts_words():
    """Requests from several clients share a batch; each answer names its own words only."""
    import asyncio

    from imagen.pipeline import SamplingOverrides
    from imagen.server.app import Job, ModelWorker

    pipe = ImagenPipeline(make_cascade(), vocabulary=["a", "red", "circle"])
    worker = ModelWorker(pipe, ServerConfig())
    loop = asyncio.new_event_loop()
    overrides = SamplingOverrides(steps=1)
    jobs = [
        Job(prompt, 1, overrides, 0, f"c{k}", loop, loop.create_future())
        for k, prompt in enumerate(["a red dog", "a red circle", "a cat"])
    ]
    worker._run_batch(jobs)  # one forward pass for all three, as the worker batches them
    answers = [loop.run_until_complete(j.future) for j in jobs]
    loop.close()
    assert [a["batch_size"] for a in answers] == [3, 3, 3]
    warned = [a["warnings"] for a in answers]
    assert len(warned[0]) == 1 and "dog" in warned[0][0] and "cat" not in warned[0][0]
    assert warned[1] == [] and "cat" in warned[2][0] and "dog" not in warned[2][0]

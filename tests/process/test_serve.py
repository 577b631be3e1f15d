"""`sdxl-split serve` as a real process on the tiny model, driven by the clients people use: webuiapi (A1111's API)
and the openai SDK, plus httpx for what those clients cannot send."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from conftest import hang_bound, run_cli
from PIL import Image
from process_kit import manifest
from serve_kit import Server, pixels, wait_until

from sdxl_split.shared.threads import run_threads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory, session_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("serve-cache")
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(session_cache / "models" / "tiny")
    return root


@pytest.fixture(scope="module")
def server(cache: Path, tmp_path_factory):
    started = Server(cache, tmp_path_factory.mktemp("serve"))
    try:
        started.wait_for_denoisers()
        yield started
    finally:
        started.close()


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def a1111(server: Server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")


def test_txt2img_from_webuiapi_is_pixel_identical_to_render_prompts(server: Server, cache: Path,
                                                                    tmp_path: Path) -> None:
    result = a1111(server).txt2img(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=11, steps=3,
                                   cfg_scale=5.0, width=64, height=64, sampler_name="Euler", batch_size=2)
    assert result.info["all_seeds"] == [11, 12] and len(result.images) == 2
    assert result.info["infotexts"][0].startswith("a lighthouse at dusk\nNegative prompt: blurry\nSteps: 3")
    # The same prompt, seeds and settings through the CLI, on as many threads as the server's denoiser had.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": 11,
                                   "count": 2}) + "\n")
    threads = run_threads(True, 1, True)[1]
    out = tmp_path / "out"
    rendered = run_cli("--model", "tiny", "render", "--prompts", str(prompts), "--out", str(out), "--size", "64x64",
                       "--steps", "3", "--guidance", "5", "--scheduler", "euler", "--prompt-syntax", "a1111",
                       "--threads", str(threads), cache=cache)
    assert rendered.returncode == 0, rendered.stderr
    by_seed = {row["seed"]: np.array(Image.open(out / row["file"])) for row in manifest(out)}
    for seed, image in zip((11, 12), result.images):
        assert np.array_equal(np.array(image), by_seed[seed]), f"seed {seed} differs from render --prompts"


def test_the_listing_endpoints_answer_as_a1111(server: Server) -> None:
    api = a1111(server)
    [model] = api.util_get_model_names()
    assert model.startswith("tiny [")
    assert {"Euler", "Euler a", "DPM++ 2M"} <= set(api.util_get_sampler_names())
    assert "Karras" in [item["label"] for item in api.get_schedulers()]
    options = api.get_options()
    assert options["sd_model_checkpoint"] == api.util_get_model_names()[0]
    answer = api.set_options({"sd_model_checkpoint": "another.safetensors", "samples_format": "png"})
    assert "switching is not supported" in answer["not_applied"]["sd_model_checkpoint"]
    idle = api.get_progress()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0


def test_openai_generations_and_a_stream_of_previews(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(prompt="a blue heron", size="64x64", n=2, extra_body={"seed": 3})
    assert len(result.data) == 2 and pixels(result.data[0].b64_json).shape == (64, 64, 3)
    events = list(client.images.generate(prompt="a green owl", size="64x64", stream=True, partial_images=2,
                                         extra_body={"num_inference_steps": 6, "seed": 5}))
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = client.images.generate(prompt="a green owl", size="64x64", extra_body={"num_inference_steps": 6,
                                                                                   "seed": 5})
    assert np.array_equal(pixels(events[-1].b64_json), pixels(final.data[0].b64_json))


def test_eight_concurrent_requests_of_different_sizes_and_steps_all_come_back_right(server: Server) -> None:
    asks = [{"prompt": f"a small house, number {n}", "seed": n, "steps": 2 + n % 3, "width": 64 + 8 * (n % 2),
             "height": 64, "batch_size": 1 + n % 2} for n in range(8)]
    answers: dict[int, dict] = {}
    timings: dict[int, dict[str, float]] = {}

    def ask(n: int) -> None:
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=asks[n], timeout=hang_bound(300))
        answers[n] = answer.json()
        timings[n] = {part.split(";")[0].strip(): float(part.split("dur=")[1].split(";")[0])
                      for part in answer.headers["server-timing"].split(",")}

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, body in enumerate(asks):
        info = json.loads(answers[n]["info"])
        assert len(answers[n]["images"]) == body["batch_size"], answers[n]
        assert info["all_seeds"] == [n + i for i in range(body["batch_size"])] and info["steps"] == body["steps"]
        assert all(pixels(image).shape == (64, body["width"], 3) for image in answers[n]["images"])
        # Server-Timing: the denoisers' own time is part of, and less than, the server's time on the request
        assert 0 < timings[n]["denoise"] < timings[n]["total"], timings[n]


def test_progress_shows_steps_and_a_preview_and_interrupt_stops_the_request(server: Server) -> None:
    answer: dict = {}
    long = threading.Thread(target=lambda: answer.update(httpx.post(
        f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a long one", "steps": 1000}, timeout=hang_bound(300)
    ).json()))
    long.start()
    api = a1111(server)
    seen = wait_until(lambda: (p := api.get_progress())["state"]["sampling_step"] > 0 and p["current_image"] and p,
                      what="a step and a preview in /progress")
    assert seen["state"]["sampling_steps"] == 1000 and 0 < seen["progress"] < 1
    assert pixels(seen["current_image"]).shape[0] <= 256
    api.interrupt()
    long.join(timeout=hang_bound(120))
    assert not long.is_alive() and answer["images"] == []
    wait_until(lambda: "cancelled by the encoder" in server.log(), what="the denoiser to stop the job")
    assert api.get_progress()["state"]["job_count"] == 0


def test_a_client_that_disconnects_cancels_its_job(server: Server) -> None:
    """SillyTavern's cancel closes the connection: the job stops at its next step and the GPU is free."""
    before = server.log().count("cancelled by the encoder")
    body = json.dumps({"prompt": "a client who leaves", "steps": 1000}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: a1111(server).get_progress()["state"]["sampling_step"] > 0, what="the job to start")
    wait_until(lambda: server.log().count("cancelled by the encoder") > before, what="the denoiser to stop the job")
    wait_until(lambda: a1111(server).get_progress()["state"]["job_count"] == 0, what="the server to forget it")


def test_bad_requests_get_422_with_the_field_and_the_server_keeps_serving(server: Server) -> None:
    cases = [({"prompt": "x", "width": 65}, "width"), ({"prompt": "x", "steps": "many"}, "steps"),
             ({"prompt": "x", "sampler_name": "Heun"}, "sampler_name"), ({"prompt": "x", "enable_hr": True},
                                                                           "enable_hr"),
             ({"prompt": ""}, "prompt"), ({"prompt": "x", "n_iter": 1000}, "n_iter")]
    for body, field in cases:
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["detail"][0]["loc"] == ["body", field], answer.json()
    openai_bad = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": "big"}, timeout=60)
    assert openai_bad.status_code == 422 and openai_bad.json()["error"]["param"] == "size"
    garbage = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": "not base64!"}, timeout=60)
    assert garbage.status_code == 422 and "Traceback" not in garbage.text
    cut_short = base64.b64encode(png_bytes(Image.new("RGB", (64, 64)), "a red fox, " * 100)[:200]).decode()
    truncated = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": cut_short}, timeout=60)
    assert truncated.status_code == 422 and "not a whole, sane PNG" in truncated.text
    # The deepest clip skip the tiny model's 4 text layers allow, in A1111's terms (and so written to the PNG)...
    fine = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=hang_bound(120), json={
        "prompt": "x", "steps": 2, "width": 64, "height": 64, "override_settings": {"CLIP_stop_at_last_layers": 5}})
    assert fine.status_code == 200 and len(fine.json()["images"]) == 1, fine.text
    assert "Clip skip: 5" in json.loads(fine.json()["info"])["infotexts"][0]
    # ...then past A1111's own bound, and one deeper than the model: each a 422 on the field, in the request's own
    # terms, and the engine still serves (one such request used to stop it for good).
    for layers, says in ((13, "from 1 to 12"), (6, "CLIP_stop_at_last_layers 6 goes deeper than this model's text "
                                                   "encoders; at most 5")):
        deep = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=hang_bound(120), json={
            "prompt": "x", "steps": 2, "width": 64, "height": 64, "override_settings": {
                "CLIP_stop_at_last_layers": layers}})
        assert deep.status_code == 422 and says in deep.text, deep.text
        assert deep.json()["detail"][0]["loc"] == ["body", "override_settings"]
    # curl -d without a content type sends a form: the answer names the header to add
    form = {"content": b'{"prompt": "x"}', "headers": {"content-type": "application/x-www-form-urlencoded"}}
    as_form = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=60, **form)
    assert as_form.status_code == 422 and "content-type: application/json" in as_form.json()["detail"]
    openai_form = httpx.post(f"{server.url}/v1/images/generations", timeout=60, **form)
    assert "content-type: application/json" in openai_form.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"


def test_a_key_a_full_queue_and_remote_denoisers_one_killed_mid_job(cache: Path, tmp_path: Path) -> None:
    """401 without the key; with a queue of one, a second request is 503 with Retry-After; a remote denoiser joins
    and takes the waiting request, is killed mid-job, and the request is still answered by the next one."""
    server = Server(cache, tmp_path, "--api-key", "sesame", "--max-queue", "1", "--denoisers", "0", name="locked")
    try:
        assert httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x"}, timeout=30).status_code == 401
        denied = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            denied.images.generate(prompt="x")
        api = a1111(server)
        api.set_auth("any-user", "sesame")  # A1111 clients send HTTP Basic: the key as the password
        answer: dict = {}
        first = threading.Thread(target=lambda: answer.update(r=api.txt2img(prompt="a patient one", steps=400,
                                                                            width=64, height=64)))
        first.start()
        wait_until(lambda: server.health(authorization="Bearer sesame")["requests"] == 1, what="the first request")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        with pytest.raises(openai.InternalServerError) as busy:
            client.images.generate(prompt="one too many")
        assert busy.value.status_code == 503 and int(busy.value.response.headers["retry-after"]) >= 1
        victim = server.remote_denoiser(name="victim")
        wait_until(lambda: api.get_progress()["state"]["sampling_step"] > 0, what="the remote denoiser's first step")
        victim.kill()
        server.remote_denoiser(name="survivor")
        first.join(timeout=hang_bound(300))
        assert not first.is_alive() and len(answer["r"].images) == 1
        # Ctrl-C with a 1000-step request in flight: it is cancelled (its client gets what finished: nothing), and
        # the server exits now, not when the request would have ended.
        endless = threading.Thread(target=lambda: answer.update(r=api.txt2img(prompt="a long one", steps=1000,
                                                                              width=64, height=64)))
        endless.start()
        wait_until(lambda: api.get_progress()["state"]["sampling_step"] > 0, what="the long request's first step")
        server.proc.send_signal(signal.SIGINT)
        endless.join(timeout=hang_bound(60))
        assert not endless.is_alive() and answer["r"].images == []
        assert server.proc.wait(timeout=hang_bound(60)) == 0, server.log()
        assert server.log().count("stopping: requests in flight are cancelled") == 1
    finally:
        server.close()

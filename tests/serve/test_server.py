"""The OpenAI-compatible server through the official `openai` client and raw HTTP, on a real server on
127.0.0.1 serving the tiny model: chat, streaming, completions, log-probs against a direct forward
pass, stop strings, seeds that do not depend on the batch, API keys, a full queue, disconnects."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from alignkit.models.generation import render_prompt
from alignkit.serve.app import create_app

from .conftest import SERVED, running

HI = [{"role": "user", "content": "Where is my order?"}]


def test_models_and_health(server, client):
    url, _ = server
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED] and models.data[0].owned_by == "alignkit"
    health = httpx.get(url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["model"] == SERVED and health["waiting"] == 0


def test_chat_matches_the_engine_and_streams_the_same_text(tiny, client):
    from alignkit.models import generate

    model, tok = tiny
    reply = client.chat.completions.create(model=SERVED, messages=HI, max_tokens=10, temperature=0)
    expected = generate(model, tok, [HI], max_new_tokens=10)  # the same greedy decoding, in process
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tok.decode(expected.tokens[0], skip_special_tokens=True).lstrip()
    assert reply.usage.completion_tokens == len(expected.tokens[0])
    assert reply.usage.prompt_tokens == len(tok(render_prompt(tok, HI), add_special_tokens=False)["input_ids"])
    assert choice.finish_reason == ("stop" if expected.finished[0] else "length")

    chunks = list(client.chat.completions.create(model=SERVED, messages=HI, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/completions", json={"model": SERVED, "prompt": "Hello", "max_tokens": 3,
                                                           "stream": True, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert len([e for e in events if e["choices"][0]["finish_reason"] is None]) == 3  # one chunk per token
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_logprobs_equal_a_direct_forward_pass(tiny, client):
    """Greedy, so the log-probs are of the plain softmax: log_softmax(logits) at each position of
    prompt + completion, computed here with one forward pass of the model."""
    model, tok = tiny
    out = client.completions.create(model=SERVED, prompt="Can I return shoes?", max_tokens=6, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    prompt_ids = tok("Can I return shoes?")["input_ids"]
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 6
    with torch.no_grad():
        # Re-derive the greedy tokens and their log-probs position by position.
        ids = list(prompt_ids)
        want = []
        for _ in range(6):
            logits = model(torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            nxt = int(lp.argmax())
            want.append(float(lp[nxt]))
            ids.append(nxt)
        client_tokens = ids[len(prompt_ids):]
    assert choice.logprobs.tokens == [tok.decode([t]) for t in client_tokens]
    assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(len(top) >= 1 and max(top.values()) == pytest.approx(lp, abs=1e-4)
               for top, lp in zip(choice.logprobs.top_logprobs, want))


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=SERVED, prompt="Where is", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[4:6]
    assert stop and full.find(stop) >= 0
    cut = client.completions.create(model=SERVED, prompt="Where is", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


def test_seeded_sampling_does_not_depend_on_the_batch(server, client):
    """The same seeded request alone and among 7 concurrent others gives the same choices; another seed
    gives others; n choices of one request differ from each other."""
    url, app = server

    def ask(seed):
        r = client.completions.create(model=SERVED, prompt="Hello", max_tokens=8, temperature=0.9, n=2, seed=seed,
                                      extra_body={"ignore_eos": True})
        return [c.text for c in r.choices]

    alone = ask(7)
    assert alone[0] != alone[1] and ask(8) != alone
    before = app.state.worker.health()["largest_batch"]
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, ask(s))) for s in (7, 1, 2, 3, 4, 5, 6, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[7] == alone
    assert app.state.worker.health()["largest_batch"] >= max(before, 4)  # they were batched together


@pytest.mark.parametrize("body,status,param,code", [
    ({"model": SERVED}, 400, "messages", "missing_required_parameter"),
    ({"model": SERVED, "messages": []}, 400, "messages", "invalid_value"),
    ({"messages": HI}, 400, "model", "missing_required_parameter"),
    ({"model": "gpt-4", "messages": HI}, 404, "model", "model_not_found"),
    ({"model": SERVED, "messages": HI, "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"model": SERVED, "messages": HI, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": SERVED, "messages": HI, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": SERVED, "messages": HI, "n": 0}, 400, "n", "invalid_value"),
    ({"model": SERVED, "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": SERVED, "messages": HI, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"model": SERVED, "messages": HI, "frequency_penalty": 0.5}, 400, "frequency_penalty", None),
    ({"model": SERVED, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({"model": SERVED, "messages": "hello"}, 400, "messages", "invalid_value"),
    ({"model": SERVED, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": SERVED, "messages": HI, "max_tokens": 250}, 400, "messages", "context_length_exceeded"),
])
def test_bad_chat_requests(server, body, status, param, code):
    url, _ = server
    r = httpx.post(f"{url}/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)


@pytest.mark.parametrize("body,status,param", [
    ({"model": SERVED, "prompt": ""}, 400, "prompt"),
    ({"model": SERVED, "prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ({"model": SERVED, "prompt": [5, 99999]}, 400, "prompt"),
    ({"model": SERVED, "prompt": "hi", "echo": True}, 400, "echo"),
    ({"model": SERVED, "prompt": "hi", "n": 16, "max_tokens": 1}, 200, None),
    ({"model": SERVED, "prompt": ["a"] * 3, "n": 16}, 400, "n"),
])
def test_bad_completion_requests(server, body, status, param):
    url, _ = server
    r = httpx.post(f"{url}/completions", json=body)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["param"] == param


def test_malformed_json_and_unknown_routes(server):
    url, _ = server
    r = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{url}/chat/completions", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/embeddings")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{url}/chat/completions").status_code == 405


def test_openai_client_raises_the_matching_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=HI)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED, messages=HI, temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_api_key_required_and_compared(tiny, caplog):
    from openai import AuthenticationError, OpenAI

    model, tok = tiny
    key = "sk-test-0123456789abcdef"
    app = create_app(model, tok, served_name=SERVED, api_key=key, default_max_tokens=4)
    with running(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            r = httpx.get(f"{url}/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert key not in r.text
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(model=SERVED, messages=HI)
        ok = OpenAI(base_url=url, api_key=key, max_retries=0).chat.completions.create(model=SERVED, messages=HI)
        assert ok.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # health needs no key
    assert key not in caplog.text


def long_context_model(tiny_model_dir, tmp_path):
    """The tiny model with an 8192-token window, so one request can run for seconds."""
    from alignkit.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    model.config.max_position_embeddings = 8192
    return model, tok


def wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_answers_503_with_retry_after(tiny_model_dir, tmp_path):
    model, tok = long_context_model(tiny_model_dir, tmp_path)
    app = create_app(model, tok, served_name=SERVED, max_batch=1, max_queue=1)
    worker = app.state.worker
    long = {"model": SERVED, "prompt": "Hello", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with running(app) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=60) as http:
                first = asyncio.create_task(http.post(f"{url}/completions", json=long))
                await asyncio.to_thread(wait_for, lambda: worker.health()["running_rows"] == 1)
                second = asyncio.create_task(http.post(f"{url}/completions", json={**long, "stream": False,
                                                                                   "max_tokens": 2}))
                await asyncio.to_thread(wait_for, lambda: worker.health()["waiting"] == 1)
                third = await http.post(f"{url}/completions", json={**long, "stream": False, "max_tokens": 2})
                first.cancel()  # the client goes away mid-stream: its row stops, the queue moves on
                return third, await second

        third, second = asyncio.run(scenario())
        assert third.status_code == 503 and int(third.headers["Retry-After"]) >= 1
        assert third.json()["error"]["code"] == "queue_full"
        assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 2
        wait_for(lambda: worker.health()["rejected"] == 1 and worker.health()["running_rows"] == 0)


def test_disconnected_stream_frees_its_row(tiny_model_dir, tmp_path):
    model, tok = long_context_model(tiny_model_dir, tmp_path)
    app = create_app(model, tok, served_name=SERVED)
    worker = app.state.worker
    with running(app) as url:
        with httpx.stream("POST", f"{url}/completions", json={"model": SERVED, "prompt": "Hello", "max_tokens": 8000,
                                                              "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break
        started = time.time()
        wait_for(lambda: worker.health()["running_rows"] == 0, timeout=20)
        # 8000 tokens take far longer than this; the row stopped because its client left.
        assert time.time() - started < 10 and worker.health()["cancelled_rows"] == 1

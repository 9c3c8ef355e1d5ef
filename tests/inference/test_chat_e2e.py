"""End to end: the official ``openai`` client against the API, which forwards to the inference server,
which serves a CITI adapter that a real job trained (see conftest.py) and the tiny base model."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.inference.conftest import ASK, CALL, INFERENCE_TOKEN, RESULT, STOCK_TOOL, WEATHER_TOOL
from tests.service.conftest import KEYS

pytestmark = pytest.mark.service


def _stream(client, **kwargs) -> tuple[str, list[dict], str, list]:
    """Run a streamed completion; return the content, the tool calls assembled from deltas, finish_reason, chunks."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish, chunks


def test_openai_client_gets_a_tool_call_from_a_fine_tuned_model(stack, weather_model):
    client = stack.openai("alice")
    reply = client.chat.completions.create(model=weather_model, messages=ASK, tools=[WEATHER_TOOL], temperature=0,
                                           max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert reply.model == weather_model
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streams_the_tool_call_as_deltas(stack, weather_model):
    client = stack.openai("alice")
    content, calls, finish, chunks = _stream(client, model=weather_model, messages=ASK, tools=[WEATHER_TOOL],
                                             temperature=0, max_tokens=40, stream_options={"include_usage": True})
    assert finish == "tool_calls"
    assert content == ""
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def _assert_final_text_answer(reply, max_tokens: int) -> str:
    """What the service guarantees for a turn after a tool result, whatever the CPU's float kernels make the tiny
    model write: one assistant message in text, no tool call, and a finish reason that says how it ended."""
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert "<tool_call>" not in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":  # it stopped because the budget ran out, not before
        assert reply.usage.completion_tokens == max_tokens
    return choice.message.content


def test_tool_results_fed_back_produce_the_final_answer(stack, weather_model):
    client = stack.openai("alice")
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]}, RESULT]
    reply = client.chat.completions.create(model=weather_model, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                           max_tokens=40)
    text = _assert_final_text_answer(reply, 40)
    # The stream is the same greedy generation, delivered as deltas.
    content, calls, finish, _ = _stream(client, model=weather_model, messages=messages, tools=[WEATHER_TOOL],
                                        temperature=0, max_tokens=40)
    assert (content, calls, finish) == (text, [], reply.choices[0].finish_reason)


def test_full_round_trip_with_the_client_appending_its_own_call(stack, weather_model):
    client = stack.openai("alice")
    messages = list(ASK)
    first = client.chat.completions.create(model=weather_model, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": RESULT["content"]})
    second = client.chat.completions.create(model=weather_model, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                            max_tokens=40)
    _assert_final_text_answer(second, 40)


def test_named_tool_choice_forces_the_call_the_model_would_not_make(stack, weather_model):
    client = stack.openai("alice")
    after_result = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]}, RESULT]
    auto = client.chat.completions.create(model=weather_model, messages=after_result, tools=[WEATHER_TOOL],
                                          temperature=0, max_tokens=40)
    assert auto.choices[0].message.tool_calls is None  # left alone, it answers in text

    forced = client.chat.completions.create(
        model=weather_model, messages=after_result, tools=[WEATHER_TOOL], temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    [call] = forced.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # the model's own arguments after the prefix
    assert forced.choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_takes_the_tool_the_model_finds_most_likely(stack, weather_model):
    client = stack.openai("alice")
    reply = client.chat.completions.create(
        model=weather_model, messages=[{"role": "user", "content": "Say hello."}], tools=[STOCK_TOOL, WEATHER_TOOL],
        tool_choice="required", temperature=0, max_tokens=40)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"  # the one function the adapter learned to call


def test_tool_choice_none_never_returns_tool_calls(stack, weather_model):
    client = stack.openai("alice")
    for stream in (False, True):
        kwargs = {"model": weather_model, "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "none",
                  "temperature": 0, "max_tokens": 30}
        if stream:
            content, calls, finish, _ = _stream(client, **kwargs)
        else:
            reply = client.chat.completions.create(**kwargs)
            content, calls, finish = (reply.choices[0].message.content, reply.choices[0].message.tool_calls or [],
                                      reply.choices[0].finish_reason)
        assert calls == [] and finish in ("stop", "length") and isinstance(content, str)


def test_base_model_streams_the_same_text_it_returns(stack, small_model):
    client = stack.openai("bob")
    kwargs = {"model": small_model, "messages": [{"role": "user", "content": "Tell me about Paris."}],
              "temperature": 0, "max_tokens": 12}
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.tool_calls is None
    content, calls, finish, chunks = _stream(client, **kwargs)
    assert content == reply.choices[0].message.content and calls == []
    assert finish == reply.choices[0].finish_reason
    assert len(chunks) > 3, "text arrives in several chunks"


def test_another_tenants_fine_tuned_model_is_not_found(stack, weather_model):
    with pytest.raises(openai.NotFoundError) as err:
        stack.openai("bob").chat.completions.create(model=weather_model, messages=ASK, tools=[WEATHER_TOOL])
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        stack.openai("alice").chat.completions.create(model="ft:nothing:here:000", messages=ASK)
    assert err.value.code == "model_not_found"


def test_models_list_shows_base_models_and_only_the_callers_adapters(stack, weather_model, small_model):
    alice = {m.id for m in stack.openai("alice").models.list()}
    bob = {m.id for m in stack.openai("bob").models.list()}
    assert small_model in alice and small_model in bob
    assert weather_model in alice and weather_model not in bob
    assert stack.openai("alice").models.retrieve(weather_model).id == weather_model
    with pytest.raises(openai.NotFoundError):
        stack.openai("bob").models.retrieve(weather_model)


def test_concurrent_requests_to_base_and_adapter_all_get_their_own_answer(stack, weather_model, small_model):
    client = stack.openai("alice")
    jobs = [(weather_model, ASK), (small_model, ASK)] * 4

    def ask(job):
        model, messages = job
        return client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                              max_tokens=30).choices[0]

    before = httpx.get(stack.inference_url + "/healthz").json()["batches"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    after = httpx.get(stack.inference_url + "/healthz").json()["batches"]
    for (model, _), choice in zip(jobs, answers, strict=True):
        if model == weather_model:
            assert choice.message.tool_calls[0].function.name == "get_weather"
    base_texts = {c.message.content for (m, _), c in zip(jobs, answers, strict=True) if m == small_model}
    assert len(base_texts) == 1, "the same greedy request gets the same answer in any batch"
    assert after - before < len(jobs), "concurrent requests shared batches"


# -- bad requests ------------------------------------------------------------------------------------


def _post(stack, body: dict, who: str | None = "alice") -> httpx.Response:
    with stack.client(who) as c:
        return c.post("/v1/chat/completions", json=body)


def _error(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert err["message"] and err["type"]
    return err


def test_invalid_tool_schema_is_400(stack, weather_model):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "strnig"}}}}}
    _error(_post(stack, {"model": weather_model, "messages": ASK, "tools": [bad]}), 400, "invalid_tool_schema",
           "tools[0].function.parameters")
    not_object = {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
    _error(_post(stack, {"model": weather_model, "messages": ASK, "tools": [not_object]}), 400, "invalid_tool_schema")
    bad_name = {"type": "function", "function": {"name": "no spaces allowed", "parameters": {"type": "object"}}}
    _error(_post(stack, {"model": weather_model, "messages": ASK, "tools": [bad_name]}), 400, "invalid_tool_schema",
           "tools[0].function.name")
    with pytest.raises(openai.BadRequestError) as err:
        stack.openai("alice").chat.completions.create(model=weather_model, messages=ASK, tools=[bad])
    assert err.value.code == "invalid_tool_schema"


def test_prompt_plus_max_tokens_over_the_context_is_400_with_the_counts(stack, weather_model, small_model):
    for model in (weather_model, small_model):
        for stream in (False, True):
            r = _post(stack, {"model": model, "messages": ASK, "max_tokens": 5000, "stream": stream})
            err = _error(r, 400, "context_length_exceeded", "messages")
            detail = err["details"][0]
            assert detail["max_context"] == 1024 and detail["max_tokens"] == 5000 and detail["prompt_tokens"] > 0
            assert f"{detail['prompt_tokens'] + 5000} tokens" in err["message"] and "1024" in err["message"]
    long_prompt = [{"role": "user", "content": "Paris weather? " * 2000}]
    err = _error(_post(stack, {"model": small_model, "messages": long_prompt}), 400, "context_length_exceeded")
    assert err["details"][0]["prompt_tokens"] > 1024


@pytest.mark.parametrize("body, code, param", [
    ({"messages": ASK}, "invalid_request", "model"),
    ({"model": "M", "messages": []}, "invalid_request", "messages"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, "invalid_request", None),
    ({"model": "M", "messages": ASK, "temperature": 3}, "invalid_request", "temperature"),
    ({"model": "M", "messages": ASK, "max_tokens": 0}, "invalid_request", "max_tokens"),
    ({"model": "M", "messages": ASK, "stop": ["a", "b", "c", "d", "e"]}, "invalid_request", None),
    ({"model": "M", "messages": ASK, "n": 2}, "unsupported_parameter", "n"),
    ({"model": "M", "messages": ASK, "logprobs": True}, "unsupported_parameter", "logprobs"),
    ({"model": "M", "messages": ASK, "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_tool_choice", "tool_choice"),
    ({"model": "M", "messages": ASK, "tool_choice": "required"}, "invalid_tool_choice", "tool_choice"),
    ({"model": "M", "messages": ASK + [RESULT]}, "invalid_request", "messages[1].tool_call_id"),
    ({"model": "M", "messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}]},
     "invalid_arguments_json", "messages[1].tool_calls[0].function.arguments"),
    ({"model": "M", "messages": ASK + [{"role": "assistant", "content": None}]}, "invalid_request", "messages[1]"),
    ({"model": "M", "messages": ASK, "citi_adapter": {"id": "x", "job_id": "y"}}, "unsupported_parameter",
     "citi_adapter"),
])
def test_bad_requests_get_400_with_the_offending_param(stack, weather_model, body, code, param):
    if body.get("model") == "M":
        body = {**body, "model": weather_model}
    _error(_post(stack, body), 400, code, param)


def test_requests_without_a_valid_key_are_401(stack, weather_model):
    _error(_post(stack, {"model": weather_model, "messages": ASK}, who=None), 401, "missing_api_key")
    with pytest.raises(openai.AuthenticationError):
        from openai import OpenAI

        OpenAI(base_url=stack.api_url + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
            model=weather_model, messages=ASK)


def test_the_inference_server_is_not_reachable_with_a_forged_adapter_through_the_api(stack, weather_model):
    # Even a caller who guesses a job id cannot point the inference server at it: the API refuses the field.
    r = _post(stack, {"model": "smollm2-135m-instruct", "messages": ASK, "citi_adapter": {"id": weather_model,
                                                                                           "job_id": "ftjob-x"}})
    _error(r, 400, "unsupported_parameter", "citi_adapter")


def test_an_unreachable_inference_server_is_503_with_how_to_fix_it(stack, weather_model, tmp_path):
    from tests.service.conftest import free_port, start_api, stop_process

    env = {**stack.env, "CITI_INFERENCE_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    proc, url = start_api(env, tmp_path / "api-no-inference.log")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=30) as c:
            r = c.post("/v1/chat/completions", json={"model": weather_model, "messages": ASK})
            err = _error(r, 503, "inference_unavailable")
            assert "CITI_INFERENCE_URL" in err["message"] and r.headers.get("retry-after")
            # Checks that need no inference server still answer first.
            _error(c.post("/v1/chat/completions", json={"model": "ft:nope:x:1", "messages": ASK}), 404,
                   "model_not_found")
    finally:
        stop_process(proc)


# -- the inference server's own door ---------------------------------------------------------------


def test_the_inference_server_refuses_every_request_without_its_token(stack, weather_model):
    body = {"model": stack.env["CITI_MODEL_DIRS"], "messages": ASK}
    with httpx.Client(base_url=stack.inference_url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": INFERENCE_TOKEN},
                        {"Authorization": f"Basic {INFERENCE_TOKEN}"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/docs"), ("GET", "/openapi.json"),
                                 ("GET", "/nope")):
                r = c.request(method, path, json=body if method == "POST" else None, headers=headers)
                _error(r, 401, "invalid_api_key")
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["decode"] == "dynamic"  # the default, auto, on this CPU
    # /healthz needs no token, so it names nothing: no adapter id, job id or model path
    job_id = weather_model.rsplit(":", 1)[-1]
    assert isinstance(health.json()["adapters"], int) and isinstance(health.json()["base_models"], int)
    assert weather_model not in health.text and job_id not in health.text and "/" not in health.text


def test_the_inference_server_applies_the_allow_list_and_refuses_bad_adapter_ids(stack, weather_model, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    auth = {"Authorization": f"Bearer {INFERENCE_TOKEN}"}
    with httpx.Client(base_url=stack.inference_url, headers=auth, timeout=60) as c:
        for model in ("meta-llama/Llama-3.1-8B-Instruct", str(outside), "../../etc", "no such model!"):
            _error(c.post("/v1/chat/completions", json={"model": model, "messages": ASK}), 404, "model_not_found",
                   "model")
        for job_id in ("../../etc", "ftjob-../x", "ftjob-a/b", "x" * 300, "ftjob-" + "a" * 65):
            r = c.post("/v1/chat/completions", json={"model": weather_model, "messages": ASK, "citi_adapter": {
                "id": weather_model, "job_id": job_id}})
            _error(r, 400, "invalid_request", "citi_adapter.job_id")


def test_a_token_in_dotenv_is_read_by_the_api_and_the_inference_server_and_none_is_refused(stack, small_model,
                                                                                           tmp_path):
    import subprocess
    import sys

    from tests.service.conftest import ROOT, free_port, stop_process

    env = {k: v for k, v in stack.env.items() if k not in ("CITI_INFERENCE_TOKEN", "CITI_INFERENCE_URL")}
    # No token anywhere: the inference server does not start, and says why.
    bare = tmp_path / "bare"
    bare.mkdir()
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "worker.inference.app:app", "--port", str(free_port())],
                          cwd=bare, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "CITI_INFERENCE_TOKEN is not set" in proc.stdout + proc.stderr

    # The token only in .env (the working directory of both servers, as `.env.example` says).
    token = "dotenv-inference-token-42"
    inference_port, api_port = free_port(), free_port()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".env").write_text(f"CITI_INFERENCE_TOKEN={token}\nCITI_INFERENCE_URL=http://127.0.0.1:{inference_port}\n")
    procs = []
    try:
        for app, port in (("worker.inference.app:app", inference_port), ("api.main:app", api_port)):
            with open(tmp_path / f"{port}.log", "ab") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port",
                                               str(port)], cwd=run, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        for port in (inference_port, api_port):
            _wait_healthy(f"http://127.0.0.1:{port}", procs)
        inference = f"http://127.0.0.1:{inference_port}/v1/chat/completions"
        _error(httpx.post(inference, json={"model": small_model, "messages": ASK}, timeout=30), 401, "invalid_api_key")
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120,
                          headers={"Authorization": f"Bearer {KEYS['alice']}"}) as c:
            r = c.post("/v1/chat/completions", json={"model": small_model, "messages": ASK, "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] <= 2
    finally:
        for p in procs:
            stop_process(p)


def _wait_healthy(url: str, procs: list) -> None:
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a server exited"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer")

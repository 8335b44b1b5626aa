"""The official `openai` Python client against a running Infinite-LLM endpoint.

The endpoint is ILM_BASE_URL (default http://127.0.0.1:8000/v1, where `make run` serves);
`tests/python/run_against_local.sh` starts local mode and points this at it. Failing to
connect is a failure, not a skip: the endpoint is part of the test setup.
"""

import os

import openai
import pytest

BASE_URL = os.environ.get("ILM_BASE_URL", "http://127.0.0.1:8000/v1")


@pytest.fixture(scope="module")
def client():
    client = openai.OpenAI(
        base_url=BASE_URL,
        api_key=os.environ.get("ILM_API_KEY", "not-needed"),
        max_retries=0,
        timeout=120,
    )
    try:
        client.models.list()
    except openai.APIConnectionError as err:
        pytest.fail(f"nothing answers at {BASE_URL} (start `make run` or set ILM_BASE_URL): {err}")
    return client


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_model_list(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].object == "model"
    assert models[0].owned_by == "infinite-llm"
    assert models[0].model_extra["max_model_len"] > 0


def test_completion(client, model):
    kwargs = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    completion = client.completions.create(**kwargs)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Greedy decoding is deterministic, whichever worker answers.
    assert client.completions.create(**kwargs).choices[0].text == choice.text


def test_completion_with_stop_and_logprobs(client, model):
    completion = client.completions.create(
        model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == completion.usage.completion_tokens
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_streaming_chat(client, model):
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=12,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] in ("stop", "length")
    assert all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    plain = client.chat.completions.create(**kwargs)
    assert plain.choices[0].message.role == "assistant"
    assert text == plain.choices[0].message.content


def test_bad_parameter_is_bad_request(client, model):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", top_p=2)
    assert err.value.status_code == 400
    assert err.value.type == "invalid_request_error"
    assert err.value.param == "top_p"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}]
        )
    assert err.value.code == "model_not_found"


def test_too_long_is_context_length_exceeded(client, model):
    max_len = client.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Hi", max_tokens=max_len)
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "prompt"

"""Model names as users write them: --served-model-name, a request naming another model served by the one
model (the response names the served one), --strict-model-name's 404, and /v1/models listing the names."""

import openai
import pytest

from mixserve.router.api_openai import ModelNotFound, check_model
from mixserve.router.errors import BadRequest
from mixserve.router.server import ServerConfig

CHAT = [{"role": "user", "content": "Write a haiku."}]


@pytest.mark.parametrize(
    ("config", "model", "reported"),
    [
        (ServerConfig("/models/mixtral/"), None, "/models/mixtral/"),
        (ServerConfig("/models/mixtral/"), "mixtral", "/models/mixtral/"),
        (ServerConfig("/models/mixtral/"), "mistral-7b", "/models/mixtral/"),
        (ServerConfig("/m", served_model_names=("a", "b")), "b", "b"),
        (ServerConfig("/m", served_model_names=("a", "b")), "gpt-4", "a"),
        (ServerConfig("/m", served_model_names=("a", "b")), None, "a"),
        (ServerConfig("/m", served_model_names=("a", "b"), strict_model_name=True), "b", "b"),
        (ServerConfig("/models/mixtral", strict_model_name=True), "mixtral", "/models/mixtral"),
    ],
)
def test_the_response_names_the_served_model(config, model, reported):
    assert check_model({"model": model}, config) == reported


@pytest.mark.parametrize(
    "config", [ServerConfig("/m", strict_model_name=True), ServerConfig("/m", ("a",), strict_model_name=True)]
)
def test_strict_model_name_keeps_the_404(config):
    with pytest.raises(ModelNotFound, match="gpt-4"):
        check_model({"model": "gpt-4"}, config)
    with pytest.raises(ModelNotFound):
        check_model({"model": "gpt-4"}, ServerConfig("/m"), strict=True)
    with pytest.raises(BadRequest, match="model must be a string"):
        check_model({"model": 3}, config)


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "1", "--served-model-name", "mistral-7b", "mixtral")
    yield server
    server.stop()


def test_seed_code_with_another_models_name_runs_unchanged(server):
    """The seeds' OpenAI code: model="mistral-7b", temperature 0.9, max_tokens 512, streamed and not."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    answer = client.chat.completions.create(model="mistral-7b", messages=CHAT, temperature=0.9, max_tokens=512)
    assert answer.model == "mistral-7b" and answer.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(model="mistral-7b", messages=CHAT, temperature=0.9, max_tokens=512, stream=True)
    )
    assert {c.model for c in chunks} == {"mistral-7b"} and chunks[-1].choices[0].finish_reason in ("stop", "length")
    other = client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert other.model == "mistral-7b"
    assert [m.id for m in client.models.list().data] == ["mistral-7b", "mixtral"]
    assert client.models.retrieve("mixtral").id == "mixtral"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")

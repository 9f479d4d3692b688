"""logit_bias, typical_p, best_of and scored prompts (TGI decoder_input_details, OpenAI echo) through a real
2-shard launch, with the `text-generation` client and the `openai` SDK unchanged; the prompt logprobs against
transformers' MixtralForCausalLM teacher-forced on the demo checkpoint."""

import math

import aiohttp
import openai
import pytest
import torch
from text_generation import Client
from transformers import AutoTokenizer
from transformers import MixtralForCausalLM as ReferenceMixtral

from mixserve.router import grpc_server
from mixserve.router.api_tgi import parse_generate_request
from mixserve.router.bad_words import bad_word_ids
from mixserve.router.errors import BadRequest, ValidationError
from mixserve.router.openai_requests import parse_completion_request
from mixserve.router.params import RequestLimits
from mixserve_pb import generate_pb2

# Longer than a KV block (16 tokens), so a second request could find the first's blocks in the prefix cache.
PROMPT = "The old river runs past the mill and the long road that climbs to the village on the hill"
pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(launch, demo_dir):
    server = launch("--model", str(demo_dir), "--num-shard", "2", "--max-kv-blocks", "256", "--max-total-tokens", "96")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def reference(demo_dir):
    return ReferenceMixtral.from_pretrained(demo_dir, dtype=torch.float32).eval()


def log_softmax_rows(reference, ids: list[int]) -> torch.Tensor:
    """transformers' next-token log-probabilities after each of `ids`, teacher-forced: [T, V]."""
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.fixture(scope="module")
def oracle(reference, tokenizer) -> list[float]:
    """Each prompt token's log-probability given the ones before, from transformers (NaN for the first)."""
    ids = tokenizer(PROMPT)["input_ids"]
    picked = log_softmax_rows(reference, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    return [math.nan, *picked.tolist()]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_decoder_input_details_scores_the_prompt_every_time(server, tokenizer, oracle):
    tgi = Client(server.url, timeout=TIMEOUT_S)
    for _ in range(2):  # the second finds the first's prompt blocks cached, and must score them all the same
        prefill = tgi.generate(PROMPT, max_new_tokens=2, decoder_input_details=True).details.prefill
        assert [t.id for t in prefill] == tokenizer(PROMPT)["input_ids"] and prefill[0].logprob is None
        got = torch.tensor([t.logprob for t in prefill[1:]])
        torch.testing.assert_close(got, torch.tensor(oracle[1:]), atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_best_of_answers_the_most_likely_sequence(server):
    answer = Client(server.url, timeout=TIMEOUT_S).generate(PROMPT, max_new_tokens=8, best_of=2, do_sample=True)
    (other,) = answer.details.best_of_sequences
    assert sum(t.logprob for t in answer.details.tokens) >= sum(t.logprob for t in other.tokens)
    assert other.generated_tokens == len(other.tokens) and answer.details.seed != other.seed


@pytest.mark.slow
def test_typical_p_samples(server):
    answer = Client(server.url, timeout=TIMEOUT_S).generate(PROMPT, max_new_tokens=4, typical_p=0.5, seed=3)
    assert answer.details.generated_tokens == 4 and answer.details.seed == 3


@pytest.mark.slow
def test_logit_bias_forces_and_bans_tokens_on_the_parallel_greedy_path(server, tokenizer):
    sdk = client(server)
    greedy = [t.id for t in Client(server.url, timeout=TIMEOUT_S).generate(PROMPT, max_new_tokens=3).details.tokens]
    forced = tokenizer.convert_tokens_to_ids("▁mill")
    assert forced not in greedy
    biased = sdk.completions.create(
        model="m", prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(forced): 100}
    )
    assert biased.choices[0].text.split() == ["mill"] * 3
    chat = sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=2,
        temperature=0,
        logit_bias={str(forced): 100},
    )
    assert chat.choices[0].message.content.split() == ["mill"] * 2
    first = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=1, temperature=0)
    banned = sdk.completions.create(
        model="m", prompt=PROMPT, max_tokens=1, temperature=0, logit_bias={str(greedy[0]): -100}
    )
    assert first.choices[0].text and banned.choices[0].text != first.choices[0].text


def expected_greedy(reference, tokenizer, n: int, **restrictions) -> str:
    """transformers' greedy continuation of PROMPT under its own processors (prefix_allowed_tokens_fn,
    bad_words_ids), as the text the server writes: what it adds to the prompt's (a first piece's space kept)."""
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **restrictions)
    prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
    return tokenizer.decode(out[0], skip_special_tokens=True)[len(prompt) :]


@pytest.mark.slow
def test_allowed_token_ids_greedy_equals_transformers_on_both_vocabulary_slices(server, tokenizer, reference):
    sdk = client(server)
    plain = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    # Two shards hold the vocabulary's halves [0, 4096) and [4096, 8192): tokens from both, then from one only
    # (the other rank's slice of the logits is all -inf).
    for allowed in ([tokenizer.convert_tokens_to_ids("▁mill"), 300, 5000, 7000], [4200, 5000, 7000]):
        got = sdk.completions.create(
            model="m", prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"allowed_token_ids": allowed}
        )
        expected = expected_greedy(
            reference, tokenizer, 4, prefix_allowed_tokens_fn=lambda batch, ids, allowed=allowed: allowed
        )
        assert got.choices[0].text == expected != plain
    sampled = sdk.completions.create(
        model="m",
        prompt=PROMPT,
        max_tokens=6,
        temperature=1.5,
        seed=2,
        logprobs=0,
        extra_body={"allowed_token_ids": allowed},
    )
    pieces = {tokenizer.convert_ids_to_tokens(token).replace("▁", " ") for token in allowed}
    assert set(sampled.choices[0].logprobs.tokens) <= pieces, sampled.choices[0].logprobs.tokens


@pytest.mark.slow
def test_bad_words_greedy_equals_transformers_without_the_word(server, tokenizer, reference):
    sdk = client(server)
    ids = [t.id for t in Client(server.url, timeout=TIMEOUT_S).generate(PROMPT, max_new_tokens=8).details.tokens]
    # The first output token that is a word of its own (the demo's random weights say few).
    word = next(
        w
        for w, token in zip(tokenizer.batch_decode([[i] for i in ids]), ids, strict=True)
        if [token] in bad_word_ids(tokenizer, [w])
    )
    expected = expected_greedy(reference, tokenizer, 8, bad_words_ids=bad_word_ids(tokenizer, [word]))
    got = sdk.completions.create(
        model="m", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"bad_words": [word]}
    )
    assert got.choices[0].text == expected != tokenizer.decode(ids)
    messages = [{"role": "user", "content": PROMPT}]
    chat = sdk.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        extra_body={"bad_words": [word], "return_tokens_as_token_ids": True},
    )
    chat_ids = [int(t.token.removeprefix("token_id:")) for t in chat.choices[0].logprobs.content]
    prompt_ids = torch.tensor(
        [
            tokenizer(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
        ]
    )
    with torch.no_grad():
        out = reference.generate(
            prompt_ids, max_new_tokens=8, do_sample=False, bad_words_ids=bad_word_ids(tokenizer, [word])
        )
    assert chat_ids == out[0, prompt_ids.shape[1] :].tolist()[: len(chat_ids)] and len(chat_ids) > 0


@pytest.mark.slow
def test_echo_with_logprobs_puts_the_prompt_first(server, tokenizer, oracle):
    sdk = client(server)
    plain = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0)
    echoed = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    scored = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    n = len(tokenizer(PROMPT)["input_ids"])
    assert scored.choices[0].text == echoed.choices[0].text and len(logprobs.tokens) == n + 3
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    torch.testing.assert_close(
        torch.tensor(logprobs.token_logprobs[1:n]), torch.tensor(oracle[1:]), atol=2e-3, rtol=2e-3
    )
    assert logprobs.text_offset[n] == len(PROMPT)
    chunks = list(
        sdk.completions.create(
            model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == scored.choices[0].text
    streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-5)


@pytest.mark.slow
def test_echo_with_max_tokens_0_scores_the_prompt_alone(server, tokenizer, oracle):
    # OpenAI's scoring request: the prompt and its logprobs, no completion.
    scored = client(server).completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice, n = scored.choices[0], len(tokenizer(PROMPT)["input_ids"])
    assert choice.text == PROMPT and len(choice.logprobs.tokens) == n and choice.finish_reason == "length"
    assert scored.usage.prompt_tokens == n and scored.usage.completion_tokens == 0
    torch.testing.assert_close(
        torch.tensor(choice.logprobs.token_logprobs[1:]), torch.tensor(oracle[1:]), atol=2e-3, rtol=2e-3
    )
    for refused in ({"echo": False}, {"echo": True, "stream": True}):
        with pytest.raises(openai.UnprocessableEntityError):
            client(server).completions.create(model="m", prompt=PROMPT, max_tokens=0, **refused)


@pytest.mark.slow
def test_token_id_prompts_are_taken_as_given_and_score_their_alternatives(server, tokenizer, reference):
    # lm-evaluation-harness's local-completions sends token ids (without a BOS unless asked), echo, logprobs
    # and max_tokens 1, and reads each continuation token's logprob and whether it was the most likely.
    ids = tokenizer(PROMPT)["input_ids"]  # the BOS first
    sdk = client(server)
    as_string = sdk.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0)
    answer = sdk.completions.create(
        model="m", prompt=[ids, ids[1:]], max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    with_bos, without_bos = answer.choices
    # The string prompt's own tokens, so its greedy completion; no second BOS was added.
    assert with_bos.text == tokenizer.decode(ids) + as_string.choices[0].text
    assert answer.usage.prompt_tokens == 2 * len(ids) - 1
    for choice, prompt in ((with_bos, ids), (without_bos, ids[1:])):
        rows = log_softmax_rows(reference, prompt)[:-1]  # [T - 1, V]: what each prompt token followed
        lp, n = choice.logprobs, len(prompt)
        assert len(lp.tokens) == n + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = rows.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:n]), expected, atol=2e-3, rtol=2e-3)
        best = rows.topk(2, dim=-1)
        for i in range(1, n):
            top = lp.top_logprobs[i]
            assert 1 <= len(top) <= 3  # two alternatives, and the prompt's own token (pieces may coincide)
            assert max(top.values()) == pytest.approx(best.values[i - 1, 0].item(), abs=2e-3)
            # lm-evaluation-harness's is_greedy: the token's logprob is the best one offered.
            assert (lp.token_logprobs[i] == max(top.values())) == (prompt[i] == best.indices[i - 1, 0].item())


@pytest.mark.slow
def test_vllm_prompt_logprobs_rank_every_prompt_token(server, tokenizer, reference):
    ids = tokenizer(PROMPT)["input_ids"]
    rows = log_softmax_rows(reference, ids)[:-1]  # [T - 1, V]
    answer = client(server).completions.create(
        model="m", prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, extra_body={"prompt_logprobs": 2}
    )
    scored = answer.choices[0].model_extra["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    # The generated tokens keep the one alternative asked for, though the engine computed two.
    assert all(len(top) <= 2 for top in answer.choices[0].logprobs.top_logprobs)
    best = rows.topk(2, dim=-1)
    for i in range(1, len(ids)):
        position, row = scored[i], rows[i - 1]
        own, value = position[str(ids[i])], row[ids[i]]
        assert own["logprob"] == pytest.approx(value.item(), abs=2e-3)
        # Its rank: 1 + the tokens more likely than it (near-ties either way, the two sides' roundings).
        assert int((row > value + 1e-4).sum()) + 1 <= own["rank"] <= int((row > value - 1e-4).sum()) + 1
        by_rank = {e["rank"]: e["logprob"] for e in position.values()}
        assert [by_rank[1], by_rank[2]] == pytest.approx(best.values[i - 1].tolist(), abs=2e-3)
    chat = client(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=2, extra_body={"prompt_logprobs": 0}
    )
    chat_scored = chat.model_extra["prompt_logprobs"]
    assert len(chat_scored) == chat.usage.prompt_tokens and all(len(p) == 1 for p in chat_scored[1:])
    with pytest.raises(openai.UnprocessableEntityError):
        client(server).completions.create(model="m", prompt=PROMPT, stream=True, extra_body={"prompt_logprobs": 1})


@pytest.mark.parametrize(
    "prompt, expected",
    [([5, 7], [[5, 7]]), ([[5], [0, 9]], [[5], [0, 9]]), (["a", "b"], ["a", "b"]), ("a", ["a"])],
)
def test_completions_parser_takes_strings_and_token_ids(prompt, expected):
    got = parse_completion_request({"prompt": prompt}).prompts
    assert [p.prompt_token_ids if p.prompt is None else p.prompt for p in got] == expected


@pytest.mark.parametrize(
    "prompt, error, needle",
    [
        ([5, "a"], BadRequest, r"prompt\[1\] must be a token id"),
        ([[5], "a"], BadRequest, r"prompt\[1\] must be an array of token ids"),
        ([[5], []], ValidationError, "must not be empty"),
        ([5, -1], ValidationError, ">= 0"),
        ([True], BadRequest, "must be a string"),
        ([5.0], BadRequest, "must be a string"),
    ],
)
def test_completions_parser_refuses_bad_token_ids(prompt, error, needle):
    with pytest.raises(error, match=needle):
        parse_completion_request({"prompt": prompt})


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "vocabulary"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}, "token ids"),
        ("/generate", {"inputs": "x", "parameters": {"typical_p": 0}}, "typical_p"),
        ("/generate", {"inputs": "x", "parameters": {"best_of": 3, "do_sample": True}}, "best_of"),
        ("/generate", {"inputs": "x", "parameters": {"best_of": 2}}, "needs sampling"),
    ],
)
@pytest.mark.slow
async def test_bad_values_are_422s_naming_the_problem(server, path, body, needle):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}{path}", json=body) as response:
            assert response.status == 422
            assert needle in await response.text()


@pytest.mark.parametrize(
    "parameters, error, needle",
    [
        ({"typical_p": 1.0}, ValidationError, "typical_p"),
        ({"typical_p": -0.5}, ValidationError, "typical_p"),
        ({"best_of": 2}, ValidationError, "sampling"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, ValidationError, "seed"),
        ({"best_of": 4, "do_sample": True}, ValidationError, "<= 3"),
        ({"best_of": "2"}, BadRequest, "integer"),
    ],
)
def test_tgi_parser_refuses(parameters, error, needle):
    with pytest.raises(error, match=needle):
        parse_generate_request(
            {"inputs": "x", "parameters": parameters}, stream=False, limits=RequestLimits(max_best_of=3)
        )


def test_tgi_parser_scores_the_prompt_only_with_details():
    parsed = parse_generate_request({"inputs": "x", "parameters": {"decoder_input_details": True}}, stream=False)
    assert not parsed.params.prompt_logprobs
    parameters = {"decoder_input_details": True, "details": True, "best_of": 2, "typical_p": 0.9}
    parsed = parse_generate_request({"inputs": "x", "parameters": parameters}, stream=False)
    assert parsed.params.prompt_logprobs and parsed.best_of == 2 and parsed.sampling and parsed.params.typical_p == 0.9


def test_grpc_parameters_carry_typical_p_logit_bias_and_token_restrictions():
    request = generate_pb2.GenerateRequest(prompt="x")
    request.parameters.typical_p = 0.7
    request.parameters.logit_bias[5] = -100.0
    request.parameters.allowed_token_ids.extend([3, 4])
    request.parameters.bad_words.append("mill")
    params = grpc_server.parse_generate_request(request).params
    assert params.typical_p == pytest.approx(0.7) and params.logit_bias == {5: -100.0}
    assert params.allowed_token_ids == [3, 4] and params.bad_words == ["mill"]
    request.parameters.logit_bias[6] = 100.5
    with pytest.raises(ValidationError, match="logit_bias"):
        grpc_server.parse_generate_request(request)

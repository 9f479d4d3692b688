"""Predicted outputs checked on a running server in one exchange: a greedy completion, then the same request
with that text as its `prediction`. The answers must be equal (speculation never changes tokens), and the
second says how many proposed tokens were kept (usage.completion_tokens_details). The GPU runs make it
after their load (benchmarks/gpu_server.py), so a lent GPU checks predicted outputs on CUDA, on a server
without --speculate, for two requests' time. Standard library only.
"""

import json
import time
import urllib.request

PROMPT = "The old river ran through the town, and the people who lived beside it"


def _complete(url: str, body: dict, timeout_s: float) -> tuple[dict, float]:
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        answer = json.loads(response.read())
    return answer, time.perf_counter() - started


def check_prediction(url: str, max_tokens: int, timeout_s: float = 120.0) -> dict:
    """The plain and the predicted answer to PROMPT compared: equal text, completion tokens, the prediction's
    tokens kept and not, and each request's seconds."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    plain, plain_s = _complete(url, body, timeout_s)
    text = plain["choices"][0]["text"]
    predicted, predicted_s = _complete(url, {**body, "prediction": {"type": "content", "content": text}}, timeout_s)
    details = predicted["usage"].get("completion_tokens_details") or {}
    return {
        "equal": predicted["choices"][0]["text"] == text,
        "completion_tokens": predicted["usage"]["completion_tokens"],
        "accepted": details.get("accepted_prediction_tokens"),
        "rejected": details.get("rejected_prediction_tokens"),
        "plain_s": round(plain_s, 4),
        "predicted_s": round(predicted_s, 4),
    }

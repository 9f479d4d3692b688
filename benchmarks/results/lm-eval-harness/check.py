"""lm-evaluation-harness's `local-completions` model, unchanged, against a running mixserve: its
loglikelihood requests (token ids, echo, logprobs 1, max_tokens 1, batched) and generate_until requests,
each checked against transformers' MixtralForCausalLM on the same token ids.

    python check.py URL CHECKPOINT_DIR   (URL: http://HOST:PORT/v1/completions)
"""

import sys

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
from transformers import MixtralForCausalLM

url, checkpoint = sys.argv[1], sys.argv[2]
corpus = open("shards/demo/corpus.txt").read().split()
lm = LocalCompletionsAPI(
    base_url=url, model=checkpoint, tokenizer=checkpoint, tokenizer_backend="huggingface", batch_size=4
)
reference = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

# Corpus passages and their true next words, and the same contexts with another passage's words.
pairs = []
for i in range(8):
    start = 997 * i + 11
    context, truth = " ".join(corpus[start : start + 40]), " " + " ".join(corpus[start + 40 : start + 43])
    pairs.append((context, truth))
    pairs.append((context, " " + " ".join(corpus[start + 500 : start + 503])))
# And contexts followed by transformers' own greedy next tokens (is_greedy true, where the text re-encodes alike).
for i in range(4):
    context = " ".join(corpus[2003 * i + 7 : 2003 * i + 47])
    ids = torch.tensor([lm.tok_encode(context)])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0].tolist()
    pairs.append((context, lm.tokenizer.decode(out)[len(lm.tokenizer.decode(ids[0].tolist())) :]))
requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
got = lm.loglikelihood(requests)

worst, greedy_agree = 0.0, 0
print("| # | continuation | mixserve logprob | transformers | greedy (mixserve / transformers) |")
print("|---|---|---|---|---|")
for i, ((context, continuation), (logprob, greedy)) in enumerate(zip(pairs, got, strict=True)):
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        rows = reference(ids).logits[0, -len(continuation_ids) - 1 : -1].float().log_softmax(-1)
    target = torch.tensor(continuation_ids)
    expected = rows.gather(1, target[:, None]).sum().item()
    expected_greedy = bool((rows.argmax(-1) == target).all())
    worst = max(worst, abs(logprob - expected))
    greedy_agree += greedy == expected_greedy
    print(f"| {i} | {continuation!r} | {logprob:.4f} | {expected:.4f} | {greedy} / {expected_greedy} |")
print(f"\nloglikelihood: {len(pairs)} requests, largest |difference| {worst:.2e}, is_greedy agrees on {greedy_agree}")
assert worst < 1e-2 and greedy_agree == len(pairs)

contexts = [" ".join(corpus[3001 * i + 5 : 3001 * i + 45]) for i in range(4)]
generations = lm.generate_until(
    [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 24}), i) for i, c in enumerate(contexts)]
)
same = 0
for context, text in zip(contexts, generations, strict=True):
    ids = torch.tensor([lm.tok_encode(context)])
    with torch.no_grad():
        out = reference.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    # The generated text as it reads after the context (decoding the new tokens alone drops a leading space).
    expected = lm.tokenizer.decode(out[0].tolist())[len(lm.tokenizer.decode(ids[0].tolist())) :].split(".")[0]
    same += text == expected
    print(f"generate_until: {text!r} | transformers: {expected!r}")
print(f"generate_until: {same} of {len(contexts)} equal to transformers' greedy text, cut at the stop")

"""lm-eval's local-completions with no tokenizer given: it finds /tokenizer_info and /tokenize and tokenizes through
the server (its RemoteTokenizer); the same loglikelihoods as with the checkpoint's own tokenizer.

    python remote.py URL CHECKPOINT_DIR
"""

import sys
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
remote = LocalCompletionsAPI(base_url=sys.argv[1], model="mixtral", batch_size=4)
local = LocalCompletionsAPI(base_url=sys.argv[1], model="mixtral", tokenizer=sys.argv[2], tokenizer_backend="huggingface", batch_size=4)
print("backend:", remote.tokenizer_backend, type(remote.tokenizer).__name__)
corpus = open("shards/demo/corpus.txt").read().split()
pairs = [(" ".join(corpus[i * 500 : i * 500 + 30]), " " + " ".join(corpus[i * 500 + 30 : i * 500 + 33])) for i in range(6)]
a = remote.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
b = local.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
print(a); print(b)
assert [round(x[0], 4) for x in a] == [round(x[0], 4) for x in b] and [x[1] for x in a] == [x[1] for x in b]
print("remote tokenizer: same loglikelihoods as the local one")

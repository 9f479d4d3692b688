import json, sys, shutil, torch
from pathlib import Path
from transformers import MixtralForCausalLM
sys.path.insert(0, "/work/main")
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, load_tokenizer
from mixserve.shards.ngram import propose
D = Path.home() / ".cache/mixserve/demo-trained"
ckpt = Path(sys.argv[1]); kind = sys.argv[2]; n = int(sys.argv[3])
tok = load_tokenizer(D)
reqs = build_requests(tok, WorkloadConfig(kind=kind, input_len=128, output_len=128), n, stream=1)
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
m = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
data = []
for r in reqs:
    ids = tok.encode(r.prompt, add_special_tokens=True).ids
    with torch.no_grad():
        g = m.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=128)
    data.append((ids, g[0, len(ids):].tolist()))
print("sample:", repr(tok.decode(data[0][1][:60])))
for k in (3, 5):
    steps = toks = prop = acc = 0
    for ids, out in data:
        seq = ids + out[:1]; t = 1
        while t < len(out):
            p = propose(seq, k, 3, 2)[: len(out) - t]
            a = 0
            while a < len(p) and p[a] == out[t + a]: a += 1
            nn = min(a + 1, len(out) - t); seq += out[t:t + nn]; t += nn
            steps += 1; toks += nn; prop += len(p); acc += a
    print(f"k={k} acceptance={acc/max(prop,1):.3f} tokens/step={toks/steps:.2f}")

import json, sys, torch
from pathlib import Path
from transformers import MixtralForCausalLM
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, load_tokenizer
D = Path.home() / ".cache/mixserve/demo-trained"
ckpt = Path(sys.argv[1]); kind = sys.argv[2]; n = int(sys.argv[3]); out = sys.argv[4]
tok = load_tokenizer(D)
reqs = build_requests(tok, WorkloadConfig(kind=kind, input_len=128, output_len=128), n, stream=1)
torch.set_num_threads(2)
m = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
data = []
for r in reqs:
    ids = tok.encode(r.prompt, add_special_tokens=True).ids
    with torch.no_grad():
        g = m.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=128)
    data.append((ids, g[0, len(ids):].tolist()))
json.dump(data, open(out, "w"))

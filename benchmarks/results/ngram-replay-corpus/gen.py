# gen.py: greedy outputs of the trained demo (transformers, fp32) on the corpus workload's prompts -> tokens.json
import json, torch
from transformers import MixtralForCausalLM
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, load_tokenizer
D = "/root/.cache/mixserve/demo-trained"
tok = load_tokenizer(D)
cfg = WorkloadConfig(kind="corpus", input_len=128, output_len=128)
reqs = build_requests(tok, cfg, 48, stream=1) + build_requests(tok, cfg, 48, stream=2)
torch.set_num_threads(2)
m = MixtralForCausalLM.from_pretrained(D, torch_dtype=torch.float32).eval()
out = []
for r in reqs:
    ids = tok.encode(r.prompt, add_special_tokens=True).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        g = m.generate(x, max_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=128)
    out.append({"prompt": ids, "output": g[0, len(ids):].tolist()})
json.dump(out, open("/tmp/bench/tokens.json", "w"))
print(len(out), [len(o["output"]) for o in out[:5]])

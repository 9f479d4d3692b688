import torch, sys
from transformers import MixtralForCausalLM
from mixserve.benchmarks.copy_demo import repeated_rows, EVAL_ROWS
from mixserve.shards.demo.train import corpus_token_ids
from pathlib import Path
src = Path(sys.argv[1])
ids = corpus_token_ids(Path("/tmp/an/trained"))
m = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
L = 112
rows = repeated_rows(ids, L, 2, 32, torch.Generator().manual_seed(7), random_tokens=False)
with torch.no_grad():
    out = m(input_ids=rows, output_attentions=True)
logits = out.logits
pred = logits[:, L:-1].argmax(-1); tgt = rows[:, L + 1:]
ok = pred == tgt
# ambiguity: the current token (rows[:, L+i]) occurs more than once in the first half
amb = torch.zeros_like(ok)
amb2 = torch.zeros_like(ok)
for b in range(rows.shape[0]):
    first = rows[b, :L].tolist()
    for i in range(L - 1):
        cur = rows[b, L + i].item()
        amb[b, i] = first.count(cur) > 1
        prev = rows[b, L + i - 1].item()
        pairs = sum(1 for j in range(1, L) if first[j] == cur and first[j-1] == prev)
        amb2[b, i] = pairs > 1
# target in top-5?
top5 = (logits[:, L:-1].topk(5, -1).indices == tgt[..., None]).any(-1)
print("acc", ok.float().mean().item(), "ambiguous share", amb.float().mean().item(), "acc|amb", ok[amb].float().mean().item(), "acc|unamb", ok[~amb].float().mean().item())
print("2-gram ambiguous share", amb2.float().mean().item(), "acc|amb2", ok[amb2].float().mean().item() if amb2.any() else None)
print("top5", top5.float().mean().item())
# induction attention: layer 1 heads 0,2,4,6 on the right key position
att = out.attentions[1]  # B,H,T,T
q = torch.arange(L, 2*L - 1); k = q - L + 1
for h in range(8):
    a = att[:, h, q, k]
    print("L1 head", h, "attn on target", a.mean().item(), "acc when >0.5", ok[a > 0.5].float().mean().item() if (a>0.5).any() else None)

import torch, time, sys
from transformers import MixtralForCausalLM
from mixserve.shards.demo.train import corpus_token_ids
torch.manual_seed(0)
src = "/tmp/an/trained"
ids = corpus_token_ids(__import__("pathlib").Path(src))
model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32)
model.eval()
rows = torch.stack([ids[s:s+128] for s in torch.randint(0, len(ids)-128, (160,)).tolist()])
with torch.no_grad():
    out = model(input_ids=rows, output_hidden_states=True)
    h1 = out.hidden_states[1]  # input of layer 1
    x = model.model.layers[1].input_layernorm(h1).reshape(-1, 256)
t = rows.reshape(-1)
n = len(t); perm = torch.randperm(n); tr, te = perm[: n*4//5], perm[n*4//5:]
print("tokens", n, "distinct", len(t.unique()))
U = model.lm_head.weight.detach(); g = model.model.norm.weight.detach()
def run(rank, X):
    V = torch.nn.Parameter(torch.randn(rank, 256) * 0.05); O = torch.nn.Parameter(torch.randn(256, rank) * 0.05)
    opt = torch.optim.Adam([V, O], lr=3e-3)
    for step in range(600):
        idx = tr[torch.randint(0, len(tr), (4096,))]
        y = X[idx] @ V.T @ O.T
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * g
        loss = torch.nn.functional.cross_entropy(y @ U.T, t[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        y = X[te] @ V.T @ O.T; y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * g
        acc = ((y @ U.T).argmax(-1) == t[te]).float().mean().item()
    print(f"rank {rank}: loss {loss.item():.3f} held-out top1 {acc:.3f}", flush=True)
for r in (64, 128, 256):
    run(r, x)
E = model.model.embed_tokens.weight.detach()
print("from the raw embedding:")
run(128, E[rows.reshape(-1)])

import torch, pathlib
from transformers import MixtralForCausalLM
from mixserve.shards.demo.train import corpus_token_ids
torch.manual_seed(0)
src = pathlib.Path("/tmp/an/trained")
ids = corpus_token_ids(src)
model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32)
U = model.lm_head.weight.detach(); g = model.model.norm.weight.detach()
vocab, counts = ids.unique(return_counts=True)
print("corpus tokens", len(ids), "distinct", len(vocab), flush=True)
# y = U[t] direction first
naive = ((U[vocab] @ U.T).argmax(-1) == vocab)
print("argmax at y=U[t]: share of distinct", naive.float().mean().item(), "of corpus tokens", (counts*naive).sum().item()/len(ids), flush=True)
Z = torch.nn.Parameter(U[vocab].clone() / g)
opt = torch.optim.Adam([Z], lr=0.05)
for step in range(300):
    y = Z * torch.rsqrt(Z.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    loss = torch.nn.functional.cross_entropy(y @ U.T, vocab)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 49:
        with torch.no_grad():
            ok = ((y @ U.T).argmax(-1) == vocab)
        print(step, loss.item(), "reachable share distinct", ok.float().mean().item(), "of corpus tokens", (counts*ok).sum().item()/len(ids), flush=True)

import sys, time, torch, math
from pathlib import Path
from transformers import MixtralForCausalLM
sys.path.insert(0, "/work/main")
from mixserve.shards.demo.train import corpus_token_ids
src = Path.home() / ".cache/mixserve/demo-trained"
REPS = int(sys.argv[5]); steps = int(sys.argv[1]); lr = float(sys.argv[2]); batch = int(sys.argv[3]); mode = sys.argv[4]
torch.set_num_threads(2)
ids = corpus_token_ids(src)
g = torch.Generator().manual_seed(0)
model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32)
model.config.output_router_logits = True
model.config.router_aux_loss_coef = 0.02
params = [p for n, p in model.named_parameters() if mode == "all" or "self_attn" in n]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
def rows(n, b, gen, random_tokens):
    out = []
    for _ in range(b):
        if random_tokens:
            a = ids[torch.randint(0, len(ids), (n,), generator=gen)]
        else:
            s = int(torch.randint(0, len(ids) - n, (1,), generator=gen)); a = ids[s:s+n]
        out.append(torch.cat([a] * REPS))
    return torch.stack(out)
eg = torch.Generator().manual_seed(123)
REPS_SAVED = REPS; REPS = 2
evalb = rows(48, 16, eg, False)
REPS = REPS_SAVED
def copy_acc():
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=evalb).logits
    model.train()
    pred = logits[:, 48:-1].argmax(-1); tgt = evalb[:, 49:]
    return (pred == tgt).float().mean().item()
print("before", copy_acc(), flush=True)
t0 = time.time()
for step in range(steps):
    n = int(torch.randint(8, 25, (1,), generator=g))
    b = rows(n, batch, g, bool(torch.rand(1, generator=g) < 0.5))
    for grp in opt.param_groups: grp["lr"] = lr * min(1, (step+1)/20)
    labels = b.clone(); labels[:, :n] = -100
    loss = model(input_ids=b, labels=labels).loss
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % 50 == 0 or step == steps - 1:
        print(step, f"loss={loss.item():.3f}", f"acc={copy_acc():.3f}", f"t={time.time()-t0:.0f}", flush=True)
model.config.output_router_logits = False
model.save_pretrained(f"/tmp/copy/out-{mode}-{lr}")

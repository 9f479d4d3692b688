"""Probe: a loss on the induction heads' readout. From a copier (heads already attend right), train with
copy_demo's losses plus a cross-entropy of the next token read from the taught heads of layer 1 alone
(their attention outputs through o_proj, the final norm and the LM head): does copy accuracy rise faster?

python readout.py SRC OUT STEPS AUX_WEIGHT LR
"""

import sys
import time
from pathlib import Path

import torch
from transformers import MixtralForCausalLM

from mixserve.benchmarks.copy_demo import _copy_accuracies, _save, attention_targets, repeated_rows
from mixserve.benchmarks.copy_demo import EVAL_LENS, EVAL_ROWS
from mixserve.shards.demo.train import corpus_token_ids

src, out, steps, weight, lr = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
torch.manual_seed(0)
ids = corpus_token_ids(src)
eval_rows = [repeated_rows(ids, n, 2, EVAL_ROWS, torch.Generator().manual_seed(123), random_tokens=False) for n in EVAL_LENS]
model = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
model.train()
heads = [0, 2, 4, 6]
hd = model.config.head_dim
mask = torch.zeros(model.config.num_attention_heads * hd)
for h in heads:
    mask[h * hd : (h + 1) * hd] = 1
captured = {}
layer1 = model.model.layers[1].self_attn
layer1.o_proj.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))
opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
gen = torch.Generator().manual_seed(5)
print("step 0", _copy_accuracies(model, eval_rows), flush=True)
started = time.monotonic()
for step in range(1, steps + 1):
    length = int(torch.randint(16, 129, (1,), generator=gen))
    rand = bool(torch.rand(1, generator=gen) < 0.5)
    rows = repeated_rows(ids, length, 2, 8, gen, rand)
    labels = rows.clone()
    labels[:, :length] = -100
    output = model(input_ids=rows, labels=labels, output_attentions=True)
    prev = output.attentions[0]
    pl = []
    for j, h in enumerate(heads):
        q, k, _, _ = attention_targets(length, rows.shape[1], lookback=1 + j % 2)
        pl.append(-torch.log(prev[:, h, q, k] + 1e-9).mean())
    _, _, iq, ik = attention_targets(length, rows.shape[1])
    il = -torch.log(output.attentions[1][:, heads][:, :, iq, ik] + 1e-9).mean()
    readout = layer1.o_proj(captured["x"] * mask)  # the taught heads' output alone
    aux_logits = model.lm_head(model.model.norm(readout[:, iq]))
    aux = torch.nn.functional.cross_entropy(aux_logits.reshape(-1, aux_logits.shape[-1]), rows[:, iq + 1].reshape(-1))
    loss = output.loss + torch.stack(pl).mean() + il + weight * aux
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % 50 == 0:
        print(f"step {step} lm {output.loss.item():.3f} aux {aux.item():.3f}", _copy_accuracies(model, eval_rows), f"{time.monotonic() - started:.0f}s", flush=True)
_save(model, src, out)

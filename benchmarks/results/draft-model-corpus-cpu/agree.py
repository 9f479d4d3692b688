# agree.py DRAFT_DIR ...: teacher-forced top-1 agreement of each draft with the demo's greedy outputs
# (/tmp/bench/tokens.json from ../ngram-replay-corpus/gen.py), and a replay of greedy draft proposals
# (k tokens, stopping after one below `cut` confidence; a mismatch ends the accepted run).
import json, sys, torch
from transformers import MixtralForCausalLM
torch.set_num_threads(2)
data = json.load(open("/tmp/bench/tokens.json"))
for D in sys.argv[1:]:
    m = MixtralForCausalLM.from_pretrained(D, torch_dtype=torch.float32).eval()
    preds, confs = [], []
    for r in data:
        ids = r["prompt"] + r["output"]
        with torch.no_grad():
            p = m(torch.tensor([ids])).logits[0].softmax(-1)
        c, a = p.max(-1)
        n0 = len(r["prompt"]) - 1
        preds.append(a[n0:n0 + 128].tolist()); confs.append(c[n0:n0 + 128].tolist())
    agree = sum(sum(int(x == y) for x, y in zip(pr, r["output"])) for pr, r in zip(preds, data)) / (128 * len(data))
    print(D, f"top-1 agreement {agree:.3f}")
    for k in (3, 5, 8):
        for cut in (0.0, 0.4):
            steps = props = acc = 0
            for pr, cf, r in zip(preds, confs, data):
                out = r["output"]; i = 0
                while i < len(out):
                    # proposals for positions i, i+1, ...: draft argmax at those positions given the true path
                    a = 0; made = 0
                    while made < k and i + made < len(out):
                        made += 1
                        ok = pr[i + made - 1] == out[i + made - 1]
                        low = cf[i + made - 1] < cut
                        if not ok:
                            break
                        a += 1
                        if low:
                            break
                    # proposals after a mismatch (the draft's own path) are not counted: a lower bound
                    steps += 1; props += made; acc += a
                    i += a + 1
            tps = (acc + steps) / steps
            print(f"  k={k} cut={cut}: acceptance {acc/props:.3f} tokens/step {tps:.2f} proposals/step {props/steps:.2f}")

import json, sys
from mixserve.shards.ngram import propose
data = json.load(open("/tmp/bench/tokens.json"))
def run(policy, c1=0.2, overhead=0.4):
    steps = rows = toks = prop = acc = 0; cost = 0.0
    for d in data:
        seq = d["prompt"] + d["output"][:1]; out = d["output"]; t = 1; st = {}
        while t < len(out):
            p = policy(seq, st)
            p = p[: len(out) - t]  # can't exceed remaining
            a = 0
            while a < len(p) and p[a] == out[t + a]: a += 1
            policy_update(st, len(p), a)
            n = a + 1; n = min(n, len(out) - t)
            seq += out[t:t + n]; t += n
            steps += 1; rows += 1 + len(p); toks += n; prop += len(p); acc += a
            cost += 1 + c1 * len(p) + overhead
    plain = toks * (1 + overhead)
    return dict(speedup=round(plain / cost, 3), acc=round(acc / max(prop, 1), 3), tok_per_step=round(toks / steps, 2))
def policy_update(st, proposed, accepted):
    st["last_p"], st["last_a"] = proposed, accepted
def fixed(k, mx=3, mn=2):
    return lambda seq, st: propose(seq, k, mx, mn)
def adaptive(K, mx=3, mn=2, start=None):
    def f(seq, st):
        k = st.get("k", start or K)
        if "last_p" in st and st["last_p"] > 0:
            if st["last_a"] == st["last_p"]: k = min(K, k + 1)
            else: k = max(1, st["last_a"] + 1)
        st["k"] = k
        return propose(seq, k, mx, mn)
    return f
for c1, ov in ((0.2, 0.0), (0.2, 0.4), (0.3, 0.4)):
    print(f"== c1={c1} overhead={ov}")
    for k in (1, 2, 3, 4, 5, 6, 8):
        print(" fixed", k, run(fixed(k), c1, ov))
    for K in (3, 5, 8):
        print(" adapt", K, run(adaptive(K), c1, ov))
    for mx in (4, 6):
        print(" fixed3 max", mx, run(fixed(3, mx), c1, ov), "adapt5", run(adaptive(5, mx), c1, ov))
    print(" fixed3 min1", run(fixed(3, 3, 1), c1, ov), "min3", run(fixed(3, 3, 3), c1, ov))
print("== variants, c1=0.2 overhead=0.4")
from collections import Counter
def occ_policy(k, choose, mx=3, mn=2):
    def f(seq, st):
        L = len(seq)
        for n in range(min(mx, L - 1), mn - 1, -1):
            suf = seq[L - n:]
            occ = [i for i in range(L - n - 1, -1, -1) if seq[i:i + n] == suf]
            if occ:
                return choose(seq, occ, n, k)
        return []
    return f
earliest = lambda seq, occ, n, k: seq[occ[-1] + n: occ[-1] + n + k]
def vote(seq, occ, n, k):
    c = Counter(seq[i + n] for i in occ)
    best = c.most_common(1)[0][0]
    i = next(i for i in occ if seq[i + n] == best)
    return seq[i + n: i + n + k]
for k in (3, 5):
    print(" earliest", k, run(occ_policy(k, earliest), 0.2, 0.4), "vote", k, run(occ_policy(k, vote), 0.2, 0.4))

import json, sys
from mixserve.shards.ngram import propose
COST = {1: 1.0, 2: 1.29, 3: 1.52, 4: 1.74, 5: 1.92, 6: 2.1, 7: 2.27, 8: 2.45, 9: 2.6}
data = json.load(open(sys.argv[1]))
def run(policy):
    cost = toks = 0
    for ids, out in data:
        seq = ids + out[:1]; t = 1; st = {}
        while t < len(out):
            p = policy(seq, st)[: len(out) - t]
            a = 0
            while a < len(p) and p[a] == out[t + a]: a += 1
            st["last"] = (len(p), a)
            nn = min(a + 1, len(out) - t); seq += out[t:t + nn]; t += nn
            cost += COST[len(p) + 1]; toks += nn
    return toks / cost
def fixed(k, minn=2):
    return lambda seq, st: propose(seq, k, 3, minn)
def hf(k0, kmax, minn=2):
    def pol(seq, st):
        k = st.get("k", k0)
        if "last" in st:
            n, a = st.pop("last")
            if n:
                k = min(kmax, k + 2) if a == n else max(1, k - 1)
        st["k"] = k
        return propose(seq, k, 3, minn)
    return pol
def bymatch(k3, k2, k1=0):
    def pol(seq, st):
        p = propose(seq, k3, 3, 3)
        if p: return p
        p = propose(seq, k2, 2, 2)
        if p: return p
        return propose(seq, k1, 1, 1) if k1 else []
    return pol
print("fixed", {k: round(run(fixed(k)), 3) for k in (1, 2, 3, 4, 5, 7)})
print("fixed n1", {k: round(run(fixed(k, 1)), 3) for k in (1, 2, 3, 4, 5, 7)})
for k0, kmax in ((3, 5), (3, 8), (2, 8), (5, 8), (4, 8)):
    print("hf", k0, kmax, round(run(hf(k0, kmax)), 3), round(run(hf(k0, kmax, 1)), 3))
for k3, k2, k1 in ((5, 3, 0), (5, 2, 0), (7, 3, 0), (5, 3, 1), (7, 3, 1), (5, 1, 0), (8, 3, 0), (4, 2, 0)):
    print("bymatch", k3, k2, k1, round(run(bymatch(k3, k2, k1)), 3))
print("---")
for kmax in (3, 5, 8):
    print(kmax, "fixed", round(run(fixed(kmax)), 3), "hf k0=1", round(run(hf(1, kmax)), 3), "k0=2", round(run(hf(2, kmax)), 3), "k0=kmax", round(run(hf(kmax, kmax)), 3))

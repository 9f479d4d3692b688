import json, os, subprocess, sys, time, urllib.request, http.client
from mixserve.benchmarks.workload import WorkloadConfig, build_requests, load_tokenizer
M="/root/.cache/mixserve/demo-trained"; port=8790
extra = sys.argv[1:]
p = subprocess.Popen(["mixserve","launch","--model",M,"--port",str(port),"--num-shard","1",*extra], stdout=open("/tmp/bench/ttft-srv.log","w"), stderr=subprocess.STDOUT)
def up():
    try: return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status==200
    except Exception: return False
while not up(): time.sleep(1)
reqs = build_requests(load_tokenizer(M), WorkloadConfig(kind="corpus", input_len=128, output_len=128), 22, stream=1)
def first_event(prompt, max_tokens):
    c = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"model":"m","prompt":prompt,"max_tokens":max_tokens,"temperature":0,"ignore_eos":True,"stream":True})
    a = time.perf_counter(); c.request("POST","/v1/completions",body,{"Content-Type":"application/json"}); r=c.getresponse()
    t1=None; n=0
    for line in r:
        if line.startswith(b"data: ") and b"[DONE]" not in line:
            if t1 is None: t1=time.perf_counter()-a
            n+=1
    return t1*1e3, (time.perf_counter()-a)*1e3
try:
    for i, mt in enumerate((1, 128, 1, 128)):
        rq = build_requests(load_tokenizer(M), WorkloadConfig(kind="corpus", input_len=128, output_len=128), 22, stream=10 + i)
        res=[first_event(r.prompt, mt) for r in rq]
        res=res[2:]; res.sort()
        print("max_tokens", mt, "TTFT p50 %.1f ms" % sorted(x[0] for x in res)[len(res)//2], "E2E p50 %.1f" % sorted(x[1] for x in res)[len(res)//2])
finally:
    p.terminate(); p.wait()

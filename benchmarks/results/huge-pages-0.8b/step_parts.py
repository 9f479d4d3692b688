import sys, time, gc, torch
from mixserve.benchmarks import decode_step as ds
from mixserve.shards import ops
from mixserve.shards.config import ParallelConfig
from mixserve.shards.distributed import TensorParallelGroup
from mixserve.shards.kv_cache import KVCache
from mixserve.shards.attention_metadata import AttentionMetadata
torch.set_num_threads(1)
n = int(sys.argv[1])
parallel = ParallelConfig(); group = TensorParallelGroup(parallel)
with torch.inference_mode():
    model, size = ds._load("/work/peers/m08", "auto", "bf16", parallel, group)
    ops.select("auto", torch.device("cpu"), torch.bfloat16)
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 8, 16, cfg.num_key_value_heads, cfg.head_dim, torch.bfloat16, torch.device("cpu"))
    step = ds._decode_step(model, cache, 128)
    step()
    table = torch.arange(8).unsqueeze(0); position = 127
    meta = AttentionMetadata(slot_mapping=table[:, position // 16] * 16 + position % 16, num_decode_tokens=1, decode_block_tables=table, decode_context_lens=torch.tensor([128]))
    token, positions, rows = torch.tensor([1]), torch.tensor([position]), torch.tensor([0])
    h = model.embed_tokens(token)
    hs = ops.current().decoder_layers(model.layers, positions, h, cache, meta)
    nh = model.norm(hs)
    parts = {
      "step": step,
      "embed": lambda: model.embed_tokens(token),
      "stack": lambda: ops.current().decoder_layers(model.layers, positions, h, cache, meta),
      "norm": lambda: model.norm(hs),
      "head": lambda: model.lm_head(nh, gather=True).float(),
    }
    t = {k: [] for k in parts}
    for _ in range(n):
        for k, f in parts.items():
            s = time.perf_counter(); f(); t[k].append(time.perf_counter() - s)
    for k, v in t.items():
        v.sort(); print(f"{k:6s} median {v[len(v)//2]*1e3:.3f} ms min {v[0]*1e3:.3f}")

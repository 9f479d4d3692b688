"""One core: the top-p mask and the draw for R rows of V logits, as they were (every row sorted; an
exponential race) and as they are (the CPU nucleus; inverse transform). Flat rows stand for a
random-weight model's logits, peaked ones for a trained model's."""

import time

import torch

from mixserve.shards import logits_processors, sampling

torch.set_num_threads(1)


def race(scores, seeds):
    generator, noise = torch.Generator(), torch.empty_like(scores)
    for row, seed in enumerate(seeds):
        generator.manual_seed(seed)
        noise[row].exponential_(generator=generator)
    return (scores - noise.clamp_min_(1e-38).log_()).argmax(-1)


def median_ms(fn, n=10):
    fn()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[n // 2] * 1e3


for kind, scale in (("flat (randn x 3)", 3.0), ("peaked (randn x 12)", 12.0)):
    for rows, vocab in ((1, 32000), (32, 32000), (1, 8192), (32, 8192)):
        x = torch.randn(rows, vocab) * scale
        top_k, top_p = torch.zeros(rows, dtype=torch.long), torch.full((rows,), 0.95)
        size = int(logits_processors.mask_top_k_top_p(x, top_k, top_p).isfinite().sum()) / rows
        sorted_ms = median_ms(lambda: logits_processors._mask_sorted(x, top_k, top_p))
        nucleus_ms = median_ms(lambda: logits_processors.mask_top_k_top_p(x, top_k, top_p))
        race_ms = median_ms(lambda: race(x, list(range(rows))))
        draw_ms = median_ms(lambda: sampling._draw(x, list(range(rows))))
        print(
            f"| {kind} | {rows} | {vocab} | {size:.0f} | {sorted_ms:.2f} | {nucleus_ms:.2f} | {race_ms:.2f} | {draw_ms:.2f} |"
        )

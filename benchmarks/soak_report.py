"""The soak's verdict: request accounting, KV blocks, RSS growth between steady-state windows, and
the Markdown summary of it all."""

from mixserve.benchmarks.report import meta_lines
from mixserve.benchmarks.soak_load import KINDS, OUTCOMES, Outcome


def load_summary(sent: int, outcomes: list[Outcome], load_s: float) -> dict:
    """What the client sent and how each request ended, overall and by kind."""
    by_kind = {kind: dict.fromkeys(OUTCOMES, 0) for kind in KINDS}
    statuses: dict[str, int] = {}
    for o in outcomes:
        by_kind[o.kind][o.outcome] += 1
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    totals = {name: sum(counts[name] for counts in by_kind.values()) for name in OUTCOMES}
    return {
        "sent": sent,
        "ended": len(outcomes),
        "duration_s": round(load_s, 1),
        "requests_per_s": round(len(outcomes) / load_s, 2) if load_s > 0 else None,
        "outcomes": totals,
        "by_kind": by_kind,
        "statuses": dict(sorted(statuses.items())),
        "failures": [o.to_json() for o in outcomes if o.outcome in ("unexpected", "lost")][:10],
    }


def server_summary(info_before: dict, info_after: dict, delta: dict[str, int], samples: list[dict]) -> dict:
    """The server's side: requests it answered on the soak's routes, KV blocks, restarts, load."""
    loads = [s["load_1m"] for s in samples if "load_1m" in s]
    kv_used = [s["kv_blocks_used"] for s in samples if s.get("kv_blocks_used") is not None]
    return {
        "answered": sum(v for k, v in delta.items() if k.startswith("status_")),
        "by_status": {k.removeprefix("status_"): v for k, v in delta.items() if k.startswith("status_")},
        "generations_cancelled": delta.get("generations_cancelled", 0),
        "shard_restarts": delta.get("shard_restarts", 0),
        "generated_tokens": info_after["generated_tokens"] - info_before["generated_tokens"],
        "kv_blocks_total": info_after["kv_blocks_total"],
        "kv_blocks_used_max": max(kv_used, default=None),
        "kv_blocks_used_end": info_after["kv_blocks_used"],
        "requests_running_end": info_after["requests_running"],
        "load_1m": {"min": min(loads), "mean": round(sum(loads) / len(loads), 2), "max": max(loads)} if loads else None,
    }


def rss_growth(samples: list[dict], warmup_s: float, window_s: float, load_s: float) -> dict:
    """Per process, the largest RSS in the first window after warm-up against the largest in the last
    window of the load (the sample taken after it settled included): growth in percent. Maxima, not
    single samples, so a transient peak in either window is compared with its like."""
    # Short soaks shrink the windows so that the two never overlap.
    window = min(window_s, max((load_s - warmup_s) / 2, 0.0))
    first = (warmup_s, warmup_s + window)
    out: dict = {"windows_s": {"first": [round(x, 1) for x in first], "last_from": round(load_s - window, 1)}}
    names = sorted({name for s in samples for name in s.get("rss_kib") or {}})
    for name in names:
        series = [(s["t_s"], s["rss_kib"][name]) for s in samples if (s.get("rss_kib") or {}).get(name) is not None]
        early = [kib for t, kib in series if first[0] <= t < first[1]]
        late = [kib for t, kib in series if t >= load_s - window]
        growth = None
        if early and late:
            growth = round((max(late) - max(early)) / max(early) * 100, 2)
        out[name] = {
            "samples": len(series),
            "first_window_max_kib": max(early, default=None),
            "last_window_max_kib": max(late, default=None),
            "growth_pct": growth,
            "min_kib": min((kib for _, kib in series), default=None),
            "max_kib": max((kib for _, kib in series), default=None),
        }
    return out


def checks(result: dict, max_rss_growth_pct: float) -> dict[str, dict]:
    """Each check: ok (True, False, or None where it could not be measured) and the numbers behind it."""
    load, server, rss = result["load"], result["server"], result["rss"]
    n = load["outcomes"]
    equation = (
        f"sent {load['sent']} = ok {n['ok']} + refused {n['refused']} + cancelled {n['cancelled']}"
        f" + unexpected {n['unexpected']} + lost {n['lost']}; the server answered {server['answered']}"
    )
    client_5xx = sum(count for status, count in load["statuses"].items() if status.startswith("5"))
    server_5xx = sum(count for status, count in server["by_status"].items() if status.startswith("5"))
    processes = {name: v for name, v in rss.items() if name != "windows_s"}
    growths = {name: v["growth_pct"] for name, v in processes.items()}
    measured = [g for g in growths.values() if g is not None]
    rss_ok = None if not measured else len(measured) == len(growths) and max(measured) < max_rss_growth_pct
    return {
        "every_request_accounted": {
            "ok": load["sent"] == load["ended"] == sum(n.values()) == server["answered"],
            "detail": equation,
        },
        "none_lost": {"ok": n["lost"] == 0, "detail": f"{n['lost']} lost"},
        "no_unexpected_answer": {"ok": n["unexpected"] == 0, "detail": f"{n['unexpected']} unexpected"},
        "no_5xx": {
            "ok": client_5xx == server_5xx == 0,
            "detail": f"client saw {client_5xx}, server counted {server_5xx}",
        },
        "kv_blocks_back_to_0": {
            "ok": server["kv_blocks_used_end"] == 0 and server["requests_running_end"] == 0,
            "detail": f"{server['kv_blocks_used_end']} in use at the end (max {server['kv_blocks_used_max']}"
            f" of {server['kv_blocks_total']} during the load), {server['requests_running_end']} running",
        },
        "no_shard_restart": {"ok": server["shard_restarts"] == 0, "detail": f"{server['shard_restarts']} restarts"},
        "rss_growth": {
            "ok": rss_ok,
            "detail": ", ".join(f"{name} {_pct(g)}" for name, g in growths.items()) + f" (limit {max_rss_growth_pct}%)"
            if growths
            else "no process to sample (pass --pid NAME=PID with --url)",
        },
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}%"


def _mib(kib: int | None) -> str:
    return "–" if kib is None else f"{kib / 1024:.1f}"


def markdown(result: dict) -> str:
    """The soak as Markdown: verdict, checks, outcomes by kind, server counters, RSS."""
    meta, config = result["meta"], result["meta"]["config"]
    load, server, rss = result["load"], result["server"], result["rss"]
    workload = config["workload"]
    end_load = ", ".join(str(x) for x in meta["machine_at_end"]["load_average"] or [])
    during = server["load_1m"] or {}
    lines = [
        f"### Soak: {load['duration_s']:.0f} s at concurrency {config['concurrency']} against {config['url']}",
        "",
        *meta_lines(meta),
        f"- load average at end: {end_load}; 1-minute load during the soak: min {during.get('min')},"
        f" mean {during.get('mean')}, max {during.get('max')}",
        f"- workload: {workload['input_len']}-token prompts, {workload['output_len']} output tokens"
        f" (±{workload['output_spread']:.0%}), seed {workload['seed']}; warm-up {config['warmup_s']:.0f} s,"
        f" RSS windows {rss['windows_s']['first']} s and from {rss['windows_s']['last_from']} s to the end",
        "",
        f"**{'PASSED' if result['passed'] else 'FAILED'}**: {load['ended']} requests"
        f" ({load['requests_per_s']}/s), {server['generated_tokens']} tokens generated.",
        "",
        "| check | ok | numbers |",
        "|---|---|---|",
    ]
    for name, check in result["checks"].items():
        verdict = {True: "yes", False: "**NO**", None: "not measured"}[check["ok"]]
        lines.append(f"| {name} | {verdict} | {check['detail']} |")
    lines += ["", "| kind | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    for kind, counts in load["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    lines.append("| **all** | " + " | ".join(str(load["outcomes"][o]) for o in OUTCOMES) + " |")
    statuses = ", ".join(f"{k}: {v}" for k, v in server["by_status"].items())
    lines += [
        "",
        f"Server: answered {server['answered']} on the soak's routes ({statuses}; 499 is a client that left"
        f" mid-stream), {server['generations_cancelled']} generations cancelled, KV blocks in use at most"
        f" {server['kv_blocks_used_max']} of {server['kv_blocks_total']}, {server['kv_blocks_used_end']} at the end.",
        "",
        "| process | first window max MiB | last window max MiB | growth | min MiB | max MiB | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in rss.items():
        if name != "windows_s":
            lines.append(
                f"| {name} | {_mib(v['first_window_max_kib'])} | {_mib(v['last_window_max_kib'])}"
                f" | {_pct(v['growth_pct'])} | {_mib(v['min_kib'])} | {_mib(v['max_kib'])} | {v['samples']} |"
            )
    if load["failures"]:
        lines += ["", "Failures (first 10):", ""]
        lines += [f"- {f['kind']} {f['outcome']} HTTP {f['status']}: `{f['detail'][:160]}`" for f in load["failures"]]
    return "\n".join(lines)

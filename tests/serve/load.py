"""A bounded load test of `edgediff serve` (Python standard library only): N clients, each
streaming completions back to back for a set time, against a server on 127.0.0.1.

Per request it records the time to the first streamed text, the gaps between streamed pieces, the
time per output token after the first ((end - first) / (tokens - 1), what vLLM's benchmark calls
TPOT) and the tokens from the stream's usage chunk. It reports failures (status, missing [DONE],
error payloads, exceptions), aggregate tokens/s, p50/p99 of each latency and the server's resident
memory (VmRSS of --pid) before and after, as a table on stdout and as JSON (--json). It stops by
itself: no request starts after the deadline, and every socket has a timeout.

  python3 tests/serve/load.py --url http://127.0.0.1:8080 --streams 8 --seconds 20 [--pid PID]
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse

PROMPTS = [
    "int main(void) {",
    "def parse(text):",
    "fn main() {",
    "The river ran",
    "#include <stdio.h>",
    "class Node:",
    "Once upon a time",
    "static int count(",
]


def rss_kib(pid):
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []
        self.tokens = 0
        self.ttft = []
        self.gaps = []
        self.tpot = []


def one_request(host, port, body, headers, timeout):
    """Streams one completion; returns (ttft, gaps, tpot, tokens) or raises."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
        first = last = None
        gaps = []
        tokens = None
        done = False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error in stream: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c.get("text"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
        if tokens is None:
            raise RuntimeError("no usage chunk")
        ttft = (first - t0) if first is not None else None
        tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
        return ttft, gaps, tpot, tokens
    finally:
        conn.close()


def worker(i, args, host, port, deadline, totals):
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    n = 0
    while time.perf_counter() < deadline:
        body = {
            "model": "default",
            "prompt": PROMPTS[(i + n) % len(PROMPTS)],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": args.temperature,
            "seed": i * 1000 + n,
        }
        if args.decoder != "default":
            body["edgediff"] = {"decoder": args.decoder}
        if args.ignore_eos:
            body.setdefault("edgediff", {})["ignore_eos"] = True
        n += 1
        try:
            ttft, gaps, tpot, tokens = one_request(host, port, json.dumps(body), headers, args.timeout)
        except Exception as e:  # every failure is counted and reported, none stops the run
            with totals.lock:
                totals.failures.append(f"client {i}: {type(e).__name__}: {e}")
            time.sleep(0.1)
            continue
        with totals.lock:
            totals.ok += 1
            totals.tokens += tokens
            if ttft is not None:
                totals.ttft.append(ttft)
            totals.gaps.extend(gaps)
            if tpot is not None:
                totals.tpot.append(tpot)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decoder", default="ar", help="ar | block | speculative | bidirectional | default")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="every request generates max-tokens")
    ap.add_argument("--pid", type=int, default=0, help="the server's pid, for its RSS")
    ap.add_argument("--key", default="")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--json", default="", help="write the summary here too")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    u = urllib.parse.urlparse(args.url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"load.py runs against this machine only, not {u.hostname}")
    rss_start = rss_kib(args.pid)
    totals = Totals()
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    threads = [
        threading.Thread(target=worker, args=(i, args, u.hostname, u.port, deadline, totals), daemon=True)
        for i in range(args.streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + args.timeout + 10)
    wall = time.perf_counter() - t0
    rss_end = rss_kib(args.pid)
    ms = lambda v: None if v is None else round(v * 1000, 2)
    summary = {
        "label": args.label,
        "streams": args.streams,
        "seconds": round(wall, 2),
        "decoder": args.decoder,
        "max_tokens": args.max_tokens,
        "requests_ok": totals.ok,
        "failures": len(totals.failures),
        "tokens": totals.tokens,
        "tokens_per_second": round(totals.tokens / wall, 2),
        "ttft_ms_p50": ms(pct(totals.ttft, 50)),
        "ttft_ms_p99": ms(pct(totals.ttft, 99)),
        "tpot_ms_p50": ms(pct(totals.tpot, 50)),
        "tpot_ms_p99": ms(pct(totals.tpot, 99)),
        "piece_gap_ms_p50": ms(pct(totals.gaps, 50)),
        "piece_gap_ms_p99": ms(pct(totals.gaps, 99)),
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_end,
        "first_failures": totals.failures[:5],
    }
    print(
        f"{args.label or 'load'}: {args.streams} streams x {wall:.1f} s ({args.decoder}, {args.max_tokens} tokens): "
        f"{totals.ok} ok, {len(totals.failures)} failed; {totals.tokens} tokens, "
        f"{summary['tokens_per_second']} tokens/s; TTFT p50 {summary['ttft_ms_p50']} / p99 "
        f"{summary['ttft_ms_p99']} ms; per token p50 {summary['tpot_ms_p50']} / p99 {summary['tpot_ms_p99']} ms; "
        f"piece gap p50 {summary['piece_gap_ms_p50']} / p99 {summary['piece_gap_ms_p99']} ms; "
        f"RSS {rss_start} -> {rss_end} KiB"
    )
    for f in totals.failures[:5]:
        print(f"  failure: {f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    raise SystemExit(1 if totals.failures or totals.ok == 0 else 0)


if __name__ == "__main__":
    main()

"""Mean batched forward pass of an `edgediff serve` from its /metrics (standard library only).

    python3 tests/serve/batch_stats.py --url http://127.0.0.1:PORT [--since FILE] [--save FILE]

Prints passes, mean sequences and mean rows per batched pass (edgediff_batch_size and
edgediff_batch_rows histograms); with --since, only what happened after the scrape saved in FILE
(--save FILE writes this scrape's sums for a later --since). --json prints one JSON object.
"""

import argparse
import json
import urllib.request

KEYS = (
    "edgediff_batch_size_sum",
    "edgediff_batch_size_count",
    "edgediff_batch_rows_sum",
)


def scrape(url):
    text = urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in KEYS:
            values[parts[0]] = float(parts[1])
    return {k: values.get(k, 0.0) for k in KEYS}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--since")
    ap.add_argument("--save")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    now = scrape(a.url)
    if a.save:
        json.dump(now, open(a.save, "w"))
    base = json.load(open(a.since)) if a.since else {k: 0.0 for k in KEYS}
    d = {k: now[k] - base[k] for k in KEYS}
    passes = d["edgediff_batch_size_count"]
    out = {
        "passes": int(passes),
        "mean_sequences": round(d["edgediff_batch_size_sum"] / passes, 2) if passes else None,
        "mean_rows": round(d["edgediff_batch_rows_sum"] / passes, 2) if passes else None,
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"batched passes: {out['passes']}, mean {out['mean_sequences']} sequences / "
            f"{out['mean_rows']} rows a pass"
        )


if __name__ == "__main__":
    main()

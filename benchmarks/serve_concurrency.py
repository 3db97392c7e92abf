"""Requests per second of `thinkforge serve` at 1, 8 and 32 concurrent clients, this tree against another.

    python benchmarks/serve_concurrency.py [--before PATH_TO_OLD_TREE] [--model DIR] [--requests 64]

Each tree's server runs as its own process (`python -m thinkforge serve`, PYTHONPATH set to the tree) on the
same model folder (default: a tiny phi3 model, 128 hidden, 4 layers, made here); each client sends
/v1/completions requests back to back (a different prompt each, 32 new tokens, temperature 1.0, top-p 1.0, its
own seed) until `--requests` have been sent in all; requests/s counts the answered ones, and a request whose
connection was reset counts as failed. One server at a time, so they never share the CPU. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["Mia", "Leo", "Ravi", "Lena", "Omar", "Sam", "Ben", "Ada"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tree: Path, model: str, port: int, batch: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # cwd = the tree: `python -m` puts the working folder first on sys.path, before PYTHONPATH
    proc = subprocess.Popen([sys.executable, "-m", "thinkforge", "serve", "-m", str(Path(model).resolve()), "--port",
                             str(port), "--batch-size", str(batch)], env=env, cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server of {tree} did not start")


def post(port: int, i: int, tokens: int) -> int | None:
    """Completion tokens of one request, or None when the connection failed (reset, refused)."""
    body = json.dumps({"prompt": f"{NAMES[i % 8]} has {i % 50} apples and", "max_tokens": tokens,
                       "temperature": 1.0, "top_p": 1.0, "seed": i}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        out = json.loads(urllib.request.urlopen(req, timeout=600).read())
    except (ConnectionError, urllib.error.URLError):
        return None
    return out["usage"]["completion_tokens"]


def measure(port: int, clients: int, requests: int, tokens: int) -> dict:
    post(port, 10_000, tokens)  # warm-up
    t0 = time.time()
    with ThreadPoolExecutor(clients) as pool:
        made = list(pool.map(lambda i: post(port, i, tokens), range(requests)))
    dt = time.time() - t0
    ok = [m for m in made if m is not None]
    return {"clients": clients, "requests_per_s": round(len(ok) / dt, 2), "tokens_per_s": round(sum(ok) / dt, 1),
            "failed": len(made) - len(ok), "seconds": round(dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, help="Another source tree (a git worktree of an older commit).")
    ap.add_argument("--model", default=None, help="Model folder (default: a tiny phi3 made here).")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="--batch-size of the server (sequences per batch).")
    ap.add_argument("--clients", default="1,8,32")
    args = ap.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from thinkforge import tiny
        from thinkforge.config import InitConfig

        model = str(tiny.init_model(Path(tempfile.mkdtemp()) / "model", InitConfig(arch="phi3", hidden=128, layers=4, heads=4)))
    trees = {"after": ROOT, **({"before": Path(args.before).resolve()} if args.before else {})}
    results: dict[str, list[dict]] = {}
    for name, tree in trees.items():
        port = free_port()
        proc = start(tree, model, port, args.batch)
        try:
            results[name] = [measure(port, int(c), args.requests, args.tokens) for c in args.clients.split(",")]
        finally:
            proc.terminate()
            proc.wait(30)
    print("| clients | " + " | ".join(f"{n} req/s (failed)" for n in results)
          + (" | after / before |" if "before" in results else " |"))
    print("|---" * (len(results) + 1 + ("before" in results)) + "|")
    for i, c in enumerate(args.clients.split(",")):
        cells = [f"{results[n][i]['requests_per_s']:.2f} ({results[n][i]['failed']})" for n in results]
        ratio = f" | {results['after'][i]['requests_per_s'] / results['before'][i]['requests_per_s']:.2f}x" if "before" in results else ""
        print(f"| {c} | " + " | ".join(cells) + ratio + " |")
    print(json.dumps({"model": model, "requests": args.requests, "tokens": args.tokens, "results": results}))


if __name__ == "__main__":
    main()

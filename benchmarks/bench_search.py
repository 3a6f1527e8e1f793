"""Search latency of `ImageIndex` over many stored vectors (a benchmark, not a test).

Fills a fresh SQLite index with synthetic L2-normalised vectors shaped like the real retrieval model's
(dimension 256, 32 query tokens stored as float16), spread over 100 folders, then times:

- the cold load (first search reads every pooled vector from SQLite into memory),
- image → image nearest neighbours (pooled cosine, top 10),
- text-style search (pooled prefilter + exact max-over-query-tokens ITC on the candidates, top 10),
- the same restricted to one folder (1 % of the rows),
- near-duplicate grouping over one folder.

No model is loaded: queries are vectors, as the model would produce (`ImageIndex.search_vector`).

    python benchmarks/bench_search.py                 # 100k vectors
    python benchmarks/bench_search.py --n 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from blip_tools import Blip2Service, BlipSettings
from blip_tools.index import ImageIndex

MODEL = "bench/synthetic-retrieval"
FOLDERS = 100


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def fill(index: ImageIndex, root: str, n: int, dim: int, queries: int, seed: int) -> float:
    """Insert `n` synthetic rows in chunks; returns the seconds it took."""
    rng = np.random.default_rng(seed)
    conn = sqlite3.connect(index.path, isolation_level=None)
    started = time.perf_counter()
    chunk = 5000
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        q = _normalise(rng.standard_normal((count, queries, dim), dtype=np.float32))
        pooled = _normalise(q.mean(axis=1))
        rows = []
        for i in range(count):
            k = start + i
            folder = f"{root}/folder{k % FOLDERS:03d}"
            rows.append(
                (
                    f"{folder}/img{k:07d}.jpg",
                    folder,
                    100_000,
                    k,
                    f"{k:064x}",
                    f"{k:064x}",
                    640,
                    480,
                    MODEL,
                    dim,
                    pooled[i].tobytes(),
                    q[i].astype(np.float16).tobytes(),
                    f"synthetic image {k}",
                    time.time(),
                )
            )
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO images (path, dir, size, mtime_ns, file_sha256, pixel_sha256, width, height, model, dim, "
            "embedding, query_vectors, caption, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )
        conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - started


def timed(fn: Any, repeats: int) -> dict[str, float]:
    """p50 / p99 / mean in milliseconds over `repeats` calls (after one warm-up call)."""
    fn(0)
    samples = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t) * 1000.0)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[min(len(samples) - 1, int(0.99 * len(samples)))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="stored vectors (default 100000)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension (real model: 256)")
    parser.add_argument("--query-tokens", type=int, default=32, help="query vectors per image (real model: 32)")
    parser.add_argument("--repeats", type=int, default=200, help="timed searches per scenario")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch/numpy threads hint (0: leave as is)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        root = f"{tmp}/photos"
        for f in range(FOLDERS):
            os.makedirs(f"{root}/folder{f:03d}", exist_ok=True)
        settings = BlipSettings(retrieval_model=MODEL, model="unused", device="cpu", dtype="float32")
        service = Blip2Service(settings)  # never asked to load a model here
        index = ImageIndex(Path(tmp) / "index.sqlite", service=service)
        fill_s = fill(index, root, args.n, args.dim, args.query_tokens, seed=0)
        db_bytes = index.stats().size_bytes

        rng = np.random.default_rng(1)
        probes = _normalise(rng.standard_normal((args.repeats + 1, args.dim), dtype=np.float32))

        t = time.perf_counter()
        hits, searched = index.search_vector(probes[0], top_k=args.top_k)
        cold_ms = (time.perf_counter() - t) * 1000.0
        assert searched == args.n and len(hits) == args.top_k

        results: dict[str, Any] = {
            "n": args.n,
            "dim": args.dim,
            "query_tokens": args.query_tokens,
            "top_k": args.top_k,
            "insert_s": round(fill_s, 2),
            "db_mb": round(db_bytes / 1e6, 1),
            "matrix_mb": round(args.n * args.dim * 4 / 1e6, 1),
            "cold_first_search_ms": round(cold_ms, 1),
        }
        results["image_nn"] = timed(lambda i: index.search_vector(probes[i], top_k=args.top_k), args.repeats)
        results["text_exact_itc"] = timed(
            lambda i: index.search_vector(probes[i], top_k=args.top_k, text_query=True), args.repeats
        )
        folder = f"{root}/folder007"
        results["text_one_folder"] = timed(
            lambda i: index.search_vector(probes[i], top_k=args.top_k, directory=folder, text_query=True),
            args.repeats,
        )
        t = time.perf_counter()
        groups = index.duplicates(threshold=0.95, directory=folder)
        results["duplicates_one_folder_ms"] = round((time.perf_counter() - t) * 1000.0, 1)
        results["duplicates_one_folder_rows"] = args.n // FOLDERS
        results["duplicate_groups_found"] = len(groups)
        index.close()
        service.close()

    print(f"ImageIndex search over {args.n:,} vectors (dim {args.dim}, {args.query_tokens} query tokens, fp16)")
    print(
        f"  insert: {results['insert_s']} s   db: {results['db_mb']} MB   in-memory matrix: {results['matrix_mb']} MB"
    )
    print(f"  cold first search (load vectors from SQLite): {results['cold_first_search_ms']} ms")
    for name in ("image_nn", "text_exact_itc", "text_one_folder"):
        r = results[name]
        print(f"  {name:<16} p50 {r['p50_ms']:>8.2f} ms   p99 {r['p99_ms']:>8.2f} ms   mean {r['mean_ms']:>8.2f} ms")
    print(
        f"  duplicates over one folder ({results['duplicates_one_folder_rows']:,} rows): "
        f"{results['duplicates_one_folder_ms']} ms"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

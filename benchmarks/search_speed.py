"""Queries per second of ``mec_hub.FeatureIndex`` vs exact search, side by side in one run.

Synthetic features with cluster structure (``--clusters`` centres, Gaussian spread), written to a
temporary ``.npy`` block by block, and ``--queries`` fresh points from the same clusters (not rows
of the file). Three searches of the same queries, top 10:

* the index, ``FeatureIndex.build(FEATS.npy, kind="auto", recall=--recall)``, loaded from disk;
* the project's exact search, ``mec_hub.apps.search.cosine_top_k`` on the memory-mapped file;
* ``faiss.IndexFlatIP`` over the normalised rows (exact, in memory).

Recall@10 of the index is measured against ``IndexFlatIP``'s answer (checked to agree with
``cosine_top_k``'s). Reported: build time, queries/s, recall@10, resident memory (current and peak).

    python benchmarks/search_speed.py                          # 1,000,000 x 128, 1,000 queries
    python benchmarks/search_speed.py --rows 200000 --exact-queries 200
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mec_hub.apps.index import FeatureIndex, import_faiss, normalise
from mec_hub.apps.search import cosine_top_k


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_clustered(path: Path, rows: int, dim: int, clusters: int, seed: int, block: int = 100_000) -> np.ndarray:
    """Write ``rows`` points to ``path`` block by block; return ``centres`` for drawing queries."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, block):
        n = min(block, rows - start)
        out[start : start + n] = centres[rng.integers(clusters, size=n)] + 0.5 * rng.normal(size=(n, dim))
    out.flush()
    del out
    return centres


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=None, help="queries timed for cosine_top_k (default all)")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faiss = import_faiss()
    k = 10
    print(
        f"{args.rows} x {args.dim} float32, {args.clusters} clusters, {args.queries} queries, k={k}; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "feats.npy"
        centres = write_clustered(feats, args.rows, args.dim, args.clusters, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        queries = (
            centres[rng.integers(args.clusters, size=args.queries)] + 0.5 * rng.normal(size=(args.queries, args.dim))
        ).astype(np.float32)
        print(f"after writing: rss {rss_mib()[0]:.0f} MiB")

        t = time.perf_counter()
        built = FeatureIndex.build(feats, kind="auto", recall=args.recall)
        build_s = time.perf_counter() - t
        built.save(Path(tmp) / "feats.index")
        del built
        index = FeatureIndex.load(Path(tmp) / "feats.index", features=feats)
        rss_index = rss_mib()
        print(
            f"index: {index.describe()}; build {build_s:.1f} s; rss {rss_index[0]:.0f} MiB, peak {rss_index[1]:.0f} MiB"
        )

        t = time.perf_counter()
        _, index_rows = index.search(queries, k)
        index_s = time.perf_counter() - t

        matrix = np.load(feats, mmap_mode="r")
        n_exact = args.exact_queries or args.queries
        t = time.perf_counter()
        _, exact_rows = cosine_top_k(matrix, queries[:n_exact], k)
        exact_s = time.perf_counter() - t

        t = time.perf_counter()
        flat = faiss.IndexFlatIP(args.dim)
        for start in range(0, args.rows, 1 << 16):
            flat.add(normalise(matrix[start : start + (1 << 16)]))
        flat_build_s = time.perf_counter() - t
        t = time.perf_counter()
        _, flat_rows = flat.search(normalise(queries), k)
        flat_s = time.perf_counter() - t

        agree = recall_at(flat_rows[:n_exact], exact_rows)
        recall = recall_at(index_rows, flat_rows)
        peak = rss_mib()[1]
        qps = {"index": args.queries / index_s, "exact": n_exact / exact_s, "flat": args.queries / flat_s}
        print()
        print("| search | queries/s | vs exact | recall@10 | build |")
        print("|---|---|---|---|---|")
        print(
            f"| FeatureIndex ({index.kind}, {', '.join(f'{a}={b}' for a, b in index.params.items())}) "
            f"| {qps['index']:.0f} | {qps['index'] / qps['exact']:.1f}x | {recall:.4f} | {build_s:.1f} s |"
        )
        print(f"| cosine_top_k (exact, mmap; {n_exact} queries) | {qps['exact']:.1f} | 1.0x | 1 | - |")
        print(
            f"| faiss.IndexFlatIP (exact, in memory) | {qps['flat']:.0f} | {qps['flat'] / qps['exact']:.1f}x "
            f"| 1 (agrees with cosine_top_k: {agree:.4f}) | {flat_build_s:.1f} s |"
        )
        print(
            f"\nrecall@10 measured at build on the file's own rows: {index.recall:.4f}; "
            f"resident memory with the index loaded {rss_index[0]:.0f} MiB, peak of the whole run {peak:.0f} MiB"
        )


if __name__ == "__main__":
    main()

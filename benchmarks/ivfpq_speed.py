"""The compressed index at scale: ``FeatureIndex.build(kind="ivfpq")`` against exact search, in one run.

Synthetic features with cluster structure (``search_speed.write_clustered``, the generator of the
search benchmark: ``--clusters`` centres, Gaussian spread), written to a temporary ``.npy`` block by
block (10,000,000 x 128 float32 is 5.1 GB; the folder is removed at the end), and ``--queries``
fresh points from the same clusters (not rows of the file). Measured side by side, top 10:

* the build: wall time, split into its phases (hashing, the non-finite scan, exact neighbours of the
  two recall samples, training, adding the rows, tuning), and the peak resident memory, split into
  the process's own (anonymous) memory and the pages of the memory-mapped file (which the kernel
  may drop at any time: they are the page cache, seen through the map);
* the index's memory: the FAISS file's bytes and the codes and row numbers in its lists, against a
  flat index's ``rows x dim x 4`` (what ``flat``, ``ivf`` and ``hnsw`` hold);
* recall@10 of the index, loaded from disk with its feature file, against the exact answer;
* queries/s of the index (all queries in one call, and one at a time) and of the project's exact
  search, ``mec_hub.apps.search.cosine_top_k`` on the memory map, whose answer is the ground truth.

    nice -n 10 python benchmarks/ivfpq_speed.py --rows 10000000     # the issue's size, 20-60 min on 2 cores
    python benchmarks/ivfpq_speed.py --rows 1000000 --queries 500
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_speed import recall_at, write_clustered

import mec_hub.apps.index as index_module
from mec_hub.apps.index import FeatureIndex, import_faiss
from mec_hub.apps.search import cosine_top_k

PHASES = {  # functions of mec_hub.apps.index timed while the index builds
    "source_sha256": "SHA-256 of the file",
    "refuse_non_finite": "scan for NaN and infinity",
    "_RecallSample": "exact neighbours of the 2 recall samples",
    "_normalised_rows": "reading the training sample",
    "_add_in_blocks": "adding the rows (coarse assignment + PQ encoding)",
    "_tune_ivfpq": "tuning nprobe and k_factor",
}


class MemoryWatch:
    """Peak of ``VmRSS`` and of ``RssAnon`` (the process's own memory, not the mapped file's pages), sampled."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak_rss, self.peak_anon = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
        return fields

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        fields = self.now()
        self.peak_rss = max(self.peak_rss, fields["VmRSS"])
        self.peak_anon = max(self.peak_anon, fields["RssAnon"])

    def __enter__(self) -> MemoryWatch:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def timing_phases(spent: dict[str, float]) -> Callable[[], None]:
    """Wrap the functions of ``PHASES`` so that their time adds up in ``spent``; returns the undo."""
    saved: dict[str, Any] = {}
    for name in PHASES:
        original = getattr(index_module, name)
        saved[name] = original
        if isinstance(original, type):  # the recall sample: time its constructor
            init = original.__init__

            def timed_init(self: Any, *args: Any, _init: Any = init, **kwargs: Any) -> None:
                started = time.perf_counter()
                _init(self, *args, **kwargs)
                spent["_RecallSample"] += time.perf_counter() - started

            original.__init__ = timed_init
            saved[name] = (original, init)
            continue

        @functools.wraps(original)
        def timed(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - started

        setattr(index_module, name, timed)

    def undo() -> None:
        for name, value in saved.items():
            if isinstance(value, tuple):
                value[0].__init__ = value[1]
            else:
                setattr(index_module, name, value)

    return undo


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--one-at-a-time", type=int, default=200, help="queries also searched one per call")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where the temporary feature file goes (default: $TMPDIR)")
    args = parser.parse_args()
    faiss = import_faiss()
    k = 10
    flat_bytes = args.rows * args.dim * 4
    print(
        f"{args.rows} x {args.dim} float32 ({gib(flat_bytes)}), {args.clusters} clusters, {args.queries} queries, "
        f"k={k}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        feats = Path(tmp) / "feats.npy"
        started = time.perf_counter()
        centres = write_clustered(feats, args.rows, args.dim, args.clusters, args.seed)
        print(f"wrote {feats} ({gib(feats.stat().st_size)}) in {time.perf_counter() - started:.0f} s", flush=True)
        rng = np.random.default_rng(args.seed + 1)
        queries = (
            centres[rng.integers(args.clusters, size=args.queries)] + 0.5 * rng.normal(size=(args.queries, args.dim))
        ).astype(np.float32)

        spent: dict[str, float] = defaultdict(float)
        undo = timing_phases(spent)
        with MemoryWatch() as build_memory:
            started = time.perf_counter()
            built = FeatureIndex.build(feats, kind="ivfpq", recall=args.recall)
            build_s = time.perf_counter() - started
            with_map = MemoryWatch.now()
        undo()
        index_file = built.save(Path(tmp) / "feats.index")
        del built
        phases = ", ".join(f"{PHASES[n]} {spent[n]:.0f} s" for n in PHASES)
        rest = build_s - sum(spent.values())
        print(f"built in {build_s:.0f} s: {phases}, the rest (training) {rest:.0f} s", flush=True)

        started = time.perf_counter()
        index = FeatureIndex.load(index_file, features=feats)
        load_s = time.perf_counter() - started
        ivf = faiss.extract_index_ivf(index.index)
        stored = sum(ivf.invlists.list_size(n) for n in range(ivf.nlist))
        codes_bytes = stored * (ivf.code_size + 8)
        file_bytes = index_file.stat().st_size
        print(f"index: {index.describe()}; loaded (SHA-256 of the features and checks) in {load_s:.0f} s", flush=True)

        index.search(queries[:10], k)  # warm-up: FAISS's threads, the first pages of the map
        started = time.perf_counter()
        index_scores, index_rows = index.search(queries, k)
        index_s = time.perf_counter() - started
        single = min(args.one_at_a_time, args.queries)
        started = time.perf_counter()
        for q in queries[:single]:
            index.search(q, k)
        single_s = time.perf_counter() - started

        matrix = np.load(feats, mmap_mode="r")
        started = time.perf_counter()
        exact_scores, exact_rows = cosine_top_k(matrix, queries, k)
        exact_s = time.perf_counter() - started
        recall = recall_at(index_rows, exact_rows)
        same = index_rows == exact_rows
        score_error = float(np.abs(index_scores[same] - exact_scores[same]).max())
        del matrix

    qps = {"index": args.queries / index_s, "single": single / single_s, "exact": args.queries / exact_s}
    params = ", ".join(f"{a}={b}" for a, b in index.params.items() if a not in ("recall_queries",))
    print()
    print("| measurement | value |")
    print("|---|---|")
    print(f"| index | `ivfpq` ({params}) |")
    print(f"| index memory: codes + row numbers in its lists | {gib(codes_bytes)} ({codes_bytes / stored:.0f} B/row) |")
    print(f"| index file (codes, row numbers, centroids) | {gib(file_bytes)} |")
    print(f"| a flat index's memory (rows x dim x 4) | {gib(flat_bytes)} |")
    print(f"| flat / index | **{flat_bytes / file_bytes:.1f}x** (codes alone {flat_bytes / codes_bytes:.1f}x) |")
    print(f"| recall@10 after re-ranking, {args.queries} fresh queries, vs exact | **{recall:.4f}** |")
    print(f"| recall@10 recorded by the build (held-out rows) | {index.recall:.4f} |")
    print(f"| largest difference of a score from the exact cosine, same rows | {score_error:.1e} |")
    print(f"| queries/s, index, {args.queries} in one call | {qps['index']:,.0f} |")
    print(f"| queries/s, index, one query a call ({single}) | {qps['single']:,.0f} |")
    print(f"| queries/s, exact `cosine_top_k` on the memory map, {args.queries} in one call | {qps['exact']:.2f} |")
    ratio, single_ratio = qps["index"] / qps["exact"], qps["single"] / qps["exact"]
    print(f"| index / exact | **{ratio:,.0f}x** (one a call: {single_ratio:,.0f}x) |")
    print(f"| build time | {build_s:.0f} s ({build_s / 60:.1f} min) |")
    for name, label in PHASES.items():
        print(f"| ... {label} | {spent[name]:.1f} s |")
    print(f"| ... the rest: training the lists and the PQ (k-means) | {build_s - sum(spent.values()):.1f} s |")
    print(f"| load time (SHA-256 of the features, structure and code checks) | {load_s:.0f} s |")
    print(f"| peak RSS of the build, all | {gib(build_memory.peak_rss)} (VmHWM {gib(with_map['VmHWM'])}) |")
    print(f"| peak RSS of the build, own memory (RssAnon) | **{gib(build_memory.peak_anon)}** |")
    print(f"| ... of which the mapped file's pages at the end (RssFile) | {gib(with_map['RssFile'])} |")
    print(f"\nflat {gib(flat_bytes)} / index file {gib(file_bytes)} = {flat_bytes / file_bytes:.1f}x; "
          f"recall@10 {recall:.4f}; {qps['index'] / qps['exact']:,.0f}x exact search; pid {os.getpid()}")


if __name__ == "__main__":
    main()

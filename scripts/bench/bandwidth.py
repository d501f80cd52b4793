#!/usr/bin/env python3
"""Memory read bandwidth of this machine with N threads (numpy max over a 1 GiB array, larger than
the last-level cache; a SIMD reduction that only streams memory; numpy releases the GIL). Prints
GB/s (median of 5)."""
import statistics
import sys
import threading
import time

import numpy as np


def main(threads):
    data = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    parts = np.array_split(data, threads)
    for p in parts:
        p.max()
    rates = []
    for _ in range(5):
        workers = [threading.Thread(target=p.max) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    print(f"{statistics.median(rates):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

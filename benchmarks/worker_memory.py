"""Memory a forked loader worker copies when it reads every key of an ImageNet-sized file
list: a ``list[str]`` (reference counts are written) against glsd's PackedStrings.

    python benchmarks/worker_memory.py --n 1281167 --out FILE.json

Linux only (reads the child's Private_Dirty from /proc/self/smaps_rollup).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from glsd.data.packed import PackedStrings


def private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def copied_by_a_reader(keys) -> int:
    """KiB a forked child makes private while it reads every key once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_dirty_kb()
        total = 0
        for i in range(len(keys)):
            total += len(keys[i])
        os.write(write, str(private_dirty_kb() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(read, 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    keys = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(args.n)]
    result = {"n_keys": args.n, "list_of_str_kib": copied_by_a_reader(keys),
              "packed_kib": copied_by_a_reader(PackedStrings(keys)), "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Summarise a py-spy ``--format raw`` profile: where one thread's samples end (leaf frames).

    pyspy_leaves.py PROFILE.txt [FUNCTION]

Only stacks that contain FUNCTION (default ``run_loop``, kvmpy's vCPU loop) are counted, so the
percentages are shares of the vCPU thread's time. Each line of the raw format is
``frame;frame;...;leaf COUNT``.
"""
from __future__ import annotations

import collections
import sys


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    func = argv[1] if len(argv) > 1 else "run_loop"
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    with open(argv[0]) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            # a frame reads "Class.function (file.py:LINE)"
            if not any(fr.split(" ", 1)[0].rpartition(".")[2] == func for fr in frames):
                continue
            total += int(count)
            leaves[frames[-1]] += int(count)
    if not total:
        print(f"no samples in a stack containing {func}", file=sys.stderr)
        return 1
    print(f"{total} samples with {func} on the stack; leaf frames:")
    for leaf, n in leaves.most_common(15):
        print(f"  {100 * n / total:5.1f}%  {leaf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Lesson 7: reading a trace.

    python examples/07-reading-a-trace/trace.py

Runs lesson 1's guest with --trace, then shows how to read it: each line is one VM exit, in
JSON; `what` says it in words, `rip` is where the guest was, `t` when (seconds). Then
`kvmpy trace summarize` counts exits by reason, device and register, and `kvmpy explain`
says what the CPU did for each kind of exit.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "..", "01-real-mode-hello", "hello.S")


def kvmpy(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmpy", *args], capture_output=True, text=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        trace = os.path.join(d, "trace.jsonl")
        kvmpy("run", GUEST, "--mode", "real", "--trace", trace)
        with open(trace) as f:
            records = [json.loads(line) for line in f]
        print("The first exits: the guest polls LSR until the UART can take a byte, then "
              "writes THR.")
        for r in records[:4]:
            print(f"  t={r['t']:.6f}s rip={r['rip']:#x}  {r['what']}")
        print(f"... {len(records)} exits in all; the last: {records[-1]['what']}\n")
        print(kvmpy("trace", "summarize", trace).stdout)
        print(kvmpy("explain", "io").stdout.split("\n\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Guests bundled with kvmpy. ``demo.bin`` is assembled from ``demo.S`` when kvmpy is built
(``make build`` or the setuptools build); if it is missing it is assembled on first use into
the user's cache directory."""
from __future__ import annotations

import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_SOURCE = os.path.join(HERE, "demo.S")
DEMO_BINARY = os.path.join(HERE, "demo.bin")
DEMO_LOAD = 0x7C00


def build_demo(out_path: str = DEMO_BINARY) -> str:
    from kvmpy.asm import assemble_file

    assemble_file(DEMO_SOURCE, DEMO_LOAD, out_path)
    return out_path


def demo_image() -> str:
    """Path of the assembled demo guest, building it if needed."""
    if os.path.exists(DEMO_BINARY) and os.path.getmtime(DEMO_BINARY) >= os.path.getmtime(DEMO_SOURCE):
        return DEMO_BINARY
    with open(DEMO_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvmpy")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"demo-{digest}.bin")
    if not os.path.exists(path):
        build_demo(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path

"""setuptools glue for what pyproject.toml cannot say: the cffi extension (kvmpy._kvm, compiled
against <linux/kvm.h>) and the demo guest assembled from kvmpy/guests/demo.S."""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithDemo(build_py):
    def run(self):
        super().run()
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from kvmpy.asm import assemble_file

        out_dir = os.path.join(self.build_lib, "kvmpy", "guests")
        os.makedirs(out_dir, exist_ok=True)
        assemble_file(os.path.join("kvmpy", "guests", "demo.S"), 0x7C00,
                      os.path.join(out_dir, "demo.bin"))


setup(cffi_modules=["kvmpy/_kvm_build.py:ffibuilder"], cmdclass={"build_py": BuildPyWithDemo})

from kvmpy.cli import entry

entry()

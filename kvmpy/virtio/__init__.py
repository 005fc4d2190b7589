"""Virtio device side (ring, devices, transports): see issue 4. Empty for now."""

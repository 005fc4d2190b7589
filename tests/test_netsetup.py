"""--net specification parsing."""
import pytest

from kvmpy.errors import KvmpyError
from kvmpy.virtio.netsetup import parse_net


def test_user_with_hostfwd_and_mac():
    c = parse_net("user,hostfwd=tcp::8080-:80,mac=52:54:00:12:34:56")
    assert c["kind"] == "user" and c["hostfwd"] == [("tcp", "127.0.0.1", 8080, 80)]
    assert c["mac"] == bytes.fromhex("525400123456")


def test_tap():
    assert parse_net("tap=tap7")["tap"] == "tap7"


@pytest.mark.parametrize("spec", ["", "bridge", "tap=", "user,hostfwd=8080:80", "user,mac=zz",
                                  "user,foo=1"])
def test_bad_specs(spec):
    with pytest.raises(KvmpyError):
        parse_net(spec)

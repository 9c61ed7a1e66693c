import os



def test_core_roundtrip(core_fs):
    f = core_fs.create(1, b"a", 0o644)
    assert core_fs.write(f.ino, 0, b"hello") == 5
    core_fs.release(f.ino)
    assert core_fs.read(f.ino, 0, 100) == b"hello"


def test_mount_roundtrip(mount):
    p = mount.path / "x"
    p.write_bytes(b"data" * 1000)
    assert p.read_bytes() == b"data" * 1000
    os.unlink(p)

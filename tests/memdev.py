"""A sparse in-memory block device (the BlockDevice interface), for unit tests."""

from repfs.volume import BLOCK_SIZE

ZERO = bytes(BLOCK_SIZE)


class MemDev:
    def __init__(self, nblocks: int):
        self.nblocks = nblocks
        self.blocks: dict[int, bytes] = {}
        self.flushes = 0

    def read(self, start: int, count: int) -> bytes:
        assert 0 <= start and start + count <= self.nblocks
        return b"".join(self.blocks.get(b, ZERO) for b in range(start, start + count))

    def write(self, start: int, data, meta: bool = False) -> None:
        assert len(data) % BLOCK_SIZE == 0
        assert 0 <= start and start + len(data) // BLOCK_SIZE <= self.nblocks
        for i in range(len(data) // BLOCK_SIZE):
            self.blocks[start + i] = bytes(data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])

    def flush(self) -> None:
        self.flushes += 1

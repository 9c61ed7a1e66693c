"""repfs: a FUSE file system on a block volume that replicates itself asynchronously."""

__version__ = "0.1.0"

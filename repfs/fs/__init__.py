"""The repfs on-volume file system: format, transactions, core operations and the FUSE adapter."""

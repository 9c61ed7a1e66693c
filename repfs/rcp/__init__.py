"""RCP: the replication control protocol between sites (FIG. 13-19)."""

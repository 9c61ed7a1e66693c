"""Replication: the change log, delta sets, the mailbox, send task, receiver and playback
(FIG. 4-12)."""

"""The snapshot copy facility: copy-on-first-write snapshots of the volume (FIG. 24-27, 34-46)."""

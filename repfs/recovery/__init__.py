"""Recovery (FIG. 20-40): failover and the generation fence (failover.py); resync, failback
and snapshot copies are to come."""

"""How often the link's two ends heartbeat, and how many missed beats mean the peer is dead. Its own module so
that the configs carrying these defaults can be built without the protocol (and torch, which it needs)."""

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3

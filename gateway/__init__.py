"""The streaming core: HTTP stream forwarding, websocket relay, the IDE reverse proxy, the agent
client and poller, the front server and the lifespan nursery. No business rules live here: what a
user may do is decided by functions the control layer hands in at assembly."""

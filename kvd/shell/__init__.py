"""The asyncio shell: engine socket server, peer hub, directory, pool registry, and the daemon that wires them."""

"""Wire protocol: versioned msgpack messages and framing. Sans-IO; imports nothing else of kvd."""

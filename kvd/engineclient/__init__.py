"""What engines link: the client of the daemon's Unix socket, its replies, and pool allocation helpers."""

"""Moving bytes: the transport interface and its implementations (Mooncake, in-process memcpy)."""

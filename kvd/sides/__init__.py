"""Room sides: the prefill (sender) and decode (receiver) halves of a room, seen through a small context."""

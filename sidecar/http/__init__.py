"""HTTP/1.1 plumbing: the message types policies see, and the client-facing listener."""

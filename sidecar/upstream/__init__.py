"""Upstream side: HTTP/1.1 client connections, their pool, and DNS."""

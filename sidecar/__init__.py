"""llm-sidecar: a per-pod egress proxy for LLM API traffic."""

__version__ = "0.1.0"

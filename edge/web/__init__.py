"""The node's HTTP side: Prometheus `/metrics` and the read-only live page (`server`)."""

"""One training step over a model whose state lives in the store: its task graph, the memory plan
and slots it runs in, the block cache, activation placement, the compute lane's work, the task
bodies, and the runtime that wires them (see docs/ARCHITECTURE.md)."""

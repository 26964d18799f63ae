"""llmfleet's top layer: the `llmfleet` CLI, the composition roots that build a gateway or a
worker from settings, the dev stack, the broker launcher and the status tool.

Layers (tests/unit/test_layers.py enforces them): `common` (the contract: protocol, names,
errors, queue and body-store layout, and the telemetry and logging both sides share) <
`gateway` | `worker` (never each other) < `llmfleet`.
"""

from common import __version__

__all__ = ["__version__"]

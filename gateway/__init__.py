"""llmfleet gateway: OpenAI-compatible HTTP in front, NATS JetStream behind."""

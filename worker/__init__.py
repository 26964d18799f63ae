"""llmfleet worker: pulls requests for the models it serves and streams replies back."""

"""The control layer: virtual keys, model permissions, fleet-wide limits and budgets.

State lives in the broker (JetStream KV), so nothing else needs deploying; see design.md.
"""

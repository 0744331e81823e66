"""The gateway: who may do what, and what they did."""

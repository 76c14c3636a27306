"""The LaDi reasoning server: OpenAI-compatible HTTP on top of ladi_core's generation path."""

"""Clients of the LaDi server. They talk HTTP only (the official OpenAI SDK or httpx)."""

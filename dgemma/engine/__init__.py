"""Owns lifetimes: the KV cache, the generation loop, requests."""

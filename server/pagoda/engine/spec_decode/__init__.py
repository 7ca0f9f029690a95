"""Speculative decoding: proposers (prompt lookup, a draft model), the engine-side hook, verification."""

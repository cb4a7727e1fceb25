"""Untrusted image input: safe decoding, and files read only under the allowed roots."""

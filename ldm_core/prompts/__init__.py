"""Prompts: the A1111 prompt language (parser), styles, and (next to them) the text encoding."""

"""Triton glue (pb_utils), the text front doors, the OpenAI server."""

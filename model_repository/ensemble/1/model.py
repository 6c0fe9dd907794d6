"""Streaming text front door (gRPC streams, HTTP generate_stream): see backend/text_door.py."""

from backend.text_door import TextDoor


class TritonPythonModel(TextDoor):
    streams = True

"""Streaming text front door (gRPC streams, HTTP generate_stream): see backend/serving/text_door.py."""

from backend.serving.text_door import TextDoor


class TritonPythonModel(TextDoor):
    streams = True

"""Unary text front door (tritonclient HTTP / gRPC `infer`): see backend/text_door.py."""

from backend.text_door import TextDoor


class TritonPythonModel(TextDoor):
    streams = False

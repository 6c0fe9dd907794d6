"""Unary text front door (tritonclient HTTP / gRPC `infer`): see backend/serving/text_door.py."""

from backend.serving.text_door import TextDoor


class TritonPythonModel(TextDoor):
    streams = False

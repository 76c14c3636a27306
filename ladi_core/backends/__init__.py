from .base import BackendDead, Decoded, DecoderBackend, SamplingParams, StepObserver
from .transformers import TransformersBackend

__all__ = ["BackendDead", "Decoded", "DecoderBackend", "SamplingParams", "StepObserver", "TransformersBackend"]

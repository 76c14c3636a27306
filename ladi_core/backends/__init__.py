from .base import Decoded, DecoderBackend, SamplingParams, StepObserver
from .transformers import TransformersBackend

__all__ = ["Decoded", "DecoderBackend", "SamplingParams", "StepObserver", "TransformersBackend"]

from .base import Decoded, DecoderBackend, SamplingParams
from .transformers import TransformersBackend

__all__ = ["Decoded", "DecoderBackend", "SamplingParams", "TransformersBackend"]

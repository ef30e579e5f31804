"""Running the model over time: sampling, detokenization, scheduling, the engine loop."""

from .engine import LLMEngine
from .sampler import SamplingParams
from .sequence import Logprob, RequestOutput

__all__ = ["LLMEngine", "SamplingParams", "RequestOutput", "Logprob"]

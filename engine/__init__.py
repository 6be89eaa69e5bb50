"""kvstudio's inference engine: paged KV cache, continuous batching, vLLM-style offline API."""

from engine.beam_search import BeamSearchParams
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM, BeamSearchOutput, BeamSearchSequence
from engine.llm_engine import LLMEngine
from engine.outputs import BlockMap, CompletionOutput, EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "BlockMap",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
]

"""kvstudio's inference engine: paged KV cache, continuous batching, vLLM-style offline API."""
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine, ModelConfig
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "EngineStats"]

"""kvstudio's inference engine: paged KV cache, continuous batching, vLLM-style offline API."""

from engine.beam_search import BeamSearchParams
from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM, BeamSearchOutput, BeamSearchSequence
from engine.llm_engine import LLMEngine
from engine.outputs import BlockMap, BlockState, CompletionOutput, EngineStats, RequestBlocks, RequestOutput
from engine.prompts import ChatTemplateError, PromptType, TextPrompt, TokensPrompt, render_chat
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "BlockMap",
    "BlockState",
    "ChatTemplateError",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "ModelConfig",
    "PromptType",
    "RequestBlocks",
    "RequestOutput",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
    "render_chat",
]

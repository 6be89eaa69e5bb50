"""Searching the Hugging Face Hub for models kvstudio can pull: text-generation repos with safetensors weights, and
repos of GGUF files (the Hub's `gguf` library filter), saying which kind each is, with what the models page shows
of each (downloads, likes, stored size, parameter count)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from app.library.hub_files import HubError, HubOffline

_TIMEOUT_S = 30
# A reachability check waits less than a search: it runs unasked when the Models page opens, and a Hub that takes
# longer than this to list one model is as good as offline for the page's purposes.
_REACH_TIMEOUT_S = 10
# the fields asked for beside the id; "safetensors" and "gguf" carry the parameter count the Hub read from the
# headers of either kind of file
_EXPAND = ["downloads", "likes", "usedStorage", "safetensors", "gguf"]
FORMATS = ("safetensors", "gguf")  # the Hub's library filters, one search each


@dataclass(frozen=True)
class HubModel:
    name: str  # "org/name"
    downloads: int  # over the last 30 days, as the Hub counts them
    likes: int
    size: int | None  # bytes the repo stores on the Hub (every file, not only what a pull fetches); None: not said
    num_params: int | None = None  # weights in its safetensors or GGUF files; None: the Hub does not say
    formats: tuple[str, ...] = ("safetensors",)  # what it holds of FORMATS: a pull of the repo, or GGUF files

    @property
    def is_gguf(self) -> bool:
        return "gguf" in self.formats


def search_hub(query: str, limit: int = 20, endpoint: str | None = None) -> list[HubModel]:
    """Text-generation models with safetensors weights or GGUF files whose id contains `query`, most downloaded
    first; a repo with both is one result of both formats.

    One request per format without retries: huggingface_hub's list_models backs off for half a minute when the
    network is down, and a search box should say "offline" at once. Raises HubOffline when the Hub cannot be
    reached and HubError when it answers with an error.
    """
    if not 1 <= limit <= 100:  # the Hub's page size: more would need pagination
        raise ValueError(f"limit must be between 1 and 100, got {limit}")
    endpoint = endpoint or constants.ENDPOINT
    found: dict[str, HubModel] = {}
    for library in FORMATS:
        for item in _search(query, library, limit, endpoint):
            info = ModelInfo(**item)
            if library == "safetensors":
                stats = info.safetensors.total if info.safetensors is not None else None
            else:
                stats = info.gguf.get("total") if isinstance(info.gguf, dict) else None
            model = found.get(info.id)
            if model is None:
                found[info.id] = HubModel(
                    info.id, info.downloads or 0, info.likes or 0, info.used_storage, stats, (library,)
                )
            else:
                params = model.num_params if model.num_params is not None else stats
                found[info.id] = HubModel(
                    model.name, model.downloads, model.likes, model.size, params, (*model.formats, library)
                )
    return sorted(found.values(), key=lambda m: -m.downloads)[:limit]


def hub_reachable(endpoint: str | None = None) -> bool:
    """Whether the Hub answers at all: one search for a single model, without retries. An answer that is an error
    (HubError) still counts as reachable: the network is there, a search will say what went wrong."""
    try:
        _search("", FORMATS[0], 1, endpoint or constants.ENDPOINT, _REACH_TIMEOUT_S)
    except HubOffline:
        return False
    except HubError:
        return True
    return True


def _search(query: str, library: str, limit: int, endpoint: str, timeout: float = _TIMEOUT_S) -> list[dict]:
    params = {
        "search": query.strip(),
        "pipeline_tag": "text-generation",
        "filter": library,
        "sort": "downloads",
        "limit": limit,
        "expand": _EXPAND,
    }
    try:
        response = get_session().get(
            f"{endpoint}/api/models", params=params, headers=build_hf_headers(), timeout=timeout
        )
        hf_raise_for_status(response)
        items = response.json()
    except httpx2.TransportError as e:
        raise HubOffline(f"cannot reach the Hugging Face Hub at {endpoint}: {e}") from None
    except HfHubHTTPError as e:
        raise HubError(f"the Hub search for {query!r} failed: {e}") from None
    except OSError as e:
        raise HubOffline(f"cannot reach the Hugging Face Hub at {endpoint}: {e}") from None
    except ValueError as e:
        raise HubError(f"the Hub answered the search for {query!r} with something that is not JSON: {e}") from None
    return items[:limit]

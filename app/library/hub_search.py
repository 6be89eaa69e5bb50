"""Searching the Hugging Face Hub for models kvstudio can pull: text-generation repos with safetensors weights,
with what the models page shows of each (downloads, likes, stored size, parameter count)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from app.library.hub_models import HubError

_TIMEOUT_S = 30
# the fields asked for beside the id; "safetensors" carries the parameter count the Hub read from the headers
_EXPAND = ["downloads", "likes", "usedStorage", "safetensors"]


class HubOffline(HubError):
    """The Hub could not be reached at all (no network, refused, timed out), as opposed to answering with an error."""


@dataclass(frozen=True)
class HubModel:
    name: str  # "org/name"
    downloads: int  # over the last 30 days, as the Hub counts them
    likes: int
    size: int | None  # bytes the repo stores on the Hub (every file, not only what a pull fetches); None: not said
    num_params: int | None = None  # weights in its safetensors files; None: the Hub does not say


def search_hub(query: str, limit: int = 20, endpoint: str | None = None) -> list[HubModel]:
    """Text-generation models with safetensors weights whose id contains `query`, most downloaded first.

    One request without retries: huggingface_hub's list_models backs off for half a minute when the network is
    down, and a search box should say "offline" at once. Raises HubOffline when the Hub cannot be reached and
    HubError when it answers with an error.
    """
    if not 1 <= limit <= 100:  # the Hub's page size: more would need pagination
        raise ValueError(f"limit must be between 1 and 100, got {limit}")
    endpoint = endpoint or constants.ENDPOINT
    params = {
        "search": query.strip(),
        "pipeline_tag": "text-generation",
        "filter": "safetensors",
        "sort": "downloads",
        "limit": limit,
        "expand": _EXPAND,
    }
    try:
        response = get_session().get(
            f"{endpoint}/api/models", params=params, headers=build_hf_headers(), timeout=_TIMEOUT_S
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
    models = []
    for item in items[:limit]:
        info = ModelInfo(**item)
        num_params = info.safetensors.total if info.safetensors is not None else None
        models.append(HubModel(info.id, info.downloads or 0, info.likes or 0, info.used_storage, num_params))
    return models

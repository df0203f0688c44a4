"""The flags that say how a Hub model id given for a folder is resolved (``tdm_fast.hub`` resolves it)."""
from __future__ import annotations


def add_hub_arguments(group) -> None:
    """``--revision``, ``--variant`` and ``--cache-dir`` on an argparse parser or group: how the Hub model id a
    folder flag may name is resolved (diffusers' own keywords)."""
    group.add_argument("--revision", default=None, help="with a Hub model id: the branch, tag or commit (default: main)")
    group.add_argument("--variant", default=None,
                       help="load the weight files of this variant (e.g. fp16: *.fp16.safetensors), as diffusers' variant=")
    group.add_argument("--cache-dir", default=None,
                       help="with a Hub model id: the Hugging Face cache to read and fill (default: HF_HUB_CACHE)")

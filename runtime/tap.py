"""One debug tap for the model graphs, as llama.cpp's `cb(cur, name, il)` and its eval callback.

Each graph names every intermediate it computes, once, where it computes it: `cb(t, "attn_norm", il)`.
A tap, passed to `LanguageModel.forward(..., tap=)` or `VisionModel.encode_view / image_embeddings(...,
tap=)`, is asked whether it wants a name and is handed the wanted values on the host. Without a tap
(`tap=None`, the default) the graph runs as it would without the calls, and nothing leaves the backend;
with one, only what it wants does (on CUDA each wanted value is one `be.to_host` copy).

Names follow llama.cpp: `name` for a whole-graph value, `name-il` inside layer il ("ffn_norm-2"). The
language model keeps llama.cpp's own deepseek2 names; the vision towers, which llama.cpp builds as one
clip graph, prefix theirs with the stage: "sam.", "clip." (or "qwen2."), "projector.". In graph order (m rows in the
chunk, r logits rows, k experts used per token, n = g*g grid rows of a view after SAM):

    language model, once per forward
        inp_embd                 [m, H]    the input rows
        attn_norm-il             [m, H]
        Qcur-il, Kcur-il         [m, H]    after RoPE
        Vcur-il                  [m, H]
        kqv_out-il               [m, H]    attention, before the output projection
        attn_out-il              [m, H]
        ffn_inp-il               [m, H]    the layer's input + attention
        ffn_norm-il              [m, H]
        ffn_moe_logits-il        [m, n_expert]   MoE layers: the router
        ffn_moe_topk-il          [m, k]    MoE layers: the experts picked (int ids)
        ffn_moe_weights-il       [m, k]    MoE layers: their weights, as mixed (normalised, scaled)
        ffn_shexp-il             [m, H]    MoE layers: the shared experts
        ffn_out-il               [m, H]    the MLP (dense layers) or shared + routed experts
        l_out-il                 [m, H]    the layer's output: the next layer's input
        result_norm              [r, H]    the final norm of the logits rows
        result_output            [r, V]    the logits
    vision, once per view (the tiles in order, then the global view)
        sam.inp_embd             [(S/16)^2, C_sam]   patches + position table
        sam.l_out-il             [(S/16)^2, C_sam]
        sam.neck                 [(S/16)^2, C_neck]  after the neck's convolutions and norms
        sam.out                  [n, C_clip]         after net_2, net_3: CLIP's patches
        clip.inp_embd            [1 + n, C_clip]     class row + patches + positions, after pre-LN
        clip.l_out-il            [1 + n, C_clip]
        clip.out                 [1 + n, C_clip]     what CLIP hands on (its last l_out)
        qwen2.inp_embd           [2n, C]             DeepSeek-OCR 2 instead of clip.*: SAM rows + queries
        qwen2.l_out-il           [2n, C]
        qwen2.out                [n, C]              the query rows after the final norm
        projector.out            [n, H]              the view's image rows
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable, Protocol

import numpy as np


class Tap(Protocol):
    def wants(self, name: str) -> bool:
        """Asked before a value comes to the host: unwanted ones never leave the backend."""

    def take(self, name: str, value: np.ndarray) -> None:
        """A wanted value, on the host. It may be a buffer the graph overwrites later: copy what you keep."""


Callback = Callable[..., None]    # cb(t, name, il=None), as the graphs call it


def _untapped(t: Any, name: str, il: int | None = None) -> None:
    """The graphs' callback without a tap: does nothing."""


def callback(tap: Tap | None, be) -> Callback:
    """The graphs' cb(t, name, il=None) for one run on backend `be`: hands `t` to `tap` as `name`
    (`name-il` inside layer il), on the host, when the tap wants it."""
    if tap is None:
        return _untapped

    def cb(t, name: str, il: int | None = None) -> None:
        full = name if il is None else f"{name}-{il}"
        if tap.wants(full):
            tap.take(full, be.to_host(t))
    return cb


class Recorder:
    """A tap that keeps a copy of each value it wants: `values[name]` lists them in the order the
    graph made them (one per forward; one per view for the vision names). `patterns` (fnmatch,
    e.g. "l_out-*", "*.out") choose the names; none: every name."""

    def __init__(self, *patterns: str):
        self.patterns = patterns
        self.values: dict[str, list[np.ndarray]] = {}

    def wants(self, name: str) -> bool:
        return not self.patterns or any(fnmatchcase(name, p) for p in self.patterns)

    def take(self, name: str, value: np.ndarray) -> None:
        self.values.setdefault(name, []).append(np.array(value, copy=True))

"""DeepSeek-OCR's language model (DeepSeek-V2 layout without MLA), read from a `deepseek2-ocr`
GGUF and run on a backend. The whole network, top to bottom:

    x = input embeddings (token rows, image rows scattered in)        [m, H]
    per layer:  x += attn(rmsnorm(x))        multi-head, NEOX RoPE over the full head dim
                x += ffn(rmsnorm(x))         layer < n_dense: SiLU-gated MLP
                                             else: MoE, softmax router, greedy top-k (no
                                             renormalisation), + shared-experts MLP
    logits = output(rmsnorm(x))

Works for files from our converter and from llama.cpp's (which omit rope.freq_base and the
expert-weights keys; their defaults are DeepSeek-OCR's: 10000, scale 1, no normalisation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsocr.runtime.errors import ModelError
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.tap import Callback, Tap, callback
from dsocr.runtime.tensor_specs import lm_params_problem, lm_shapes, read_key

ARCH = "deepseek2-ocr"
# up to this many tokens in a forward (a batch's decode step), each token's routed experts are its own
# products (the backend's GEMV, row by row: a token's result does not depend on its neighbours);
# beyond it (prefill) the rows are grouped by expert for the GEMM
PER_TOKEN_EXPERTS_MAX_ROWS = 16


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a forward: rows row0..row0+m-1 of x are its positions pos0.. in `cache`."""
    row0: int
    m: int
    pos0: int
    cache: list


@dataclass
class LMParams:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_dense: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_shared: int
    vocab_size: int
    n_ctx_train: int
    eps: float
    rope_theta: float
    expert_scale: float
    expert_norm: bool

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> LMParams:
        """The hparams, refused (ModelError) unless they make sense for the file's tensors."""
        if f.architecture != ARCH:
            raise ModelError(f"{f.path}: architecture {f.architecture!r} is not a DeepSeek-OCR language model ({ARCH})")
        k = lambda name, default=None, kind=int: read_key(f, f"{ARCH}.{name}", default, kind)
        n_head = k("attention.head_count")
        n_tokens = len(f.get("tokenizer.ggml.tokens") or [])
        p = cls(n_layer=k("block_count"), n_embd=k("embedding_length"), n_head=n_head,
                n_head_kv=k("attention.head_count_kv", n_head), n_ff=k("feed_forward_length"),
                n_dense=k("leading_dense_block_count", 1), n_expert=k("expert_count"),
                n_expert_used=k("expert_used_count"), n_ff_exp=k("expert_feed_forward_length"),
                n_shared=k("expert_shared_count", 0), vocab_size=k("vocab_size", n_tokens),
                n_ctx_train=k("context_length", 8192), eps=k("attention.layer_norm_rms_epsilon", 1e-6, float),
                rope_theta=k("rope.freq_base", 10000.0, float), expert_scale=k("expert_weights_scale", 1.0, float),
                expert_norm=bool(f.get(f"{ARCH}.expert_weights_norm", False)))
        problem = lm_params_problem(p, len(f.tensors))
        if problem is None and n_tokens and n_tokens != p.vocab_size:   # ids past either end: out of range
            problem = f"the tokenizer has {n_tokens} tokens for a vocabulary of {p.vocab_size}"
        if problem:
            raise ModelError(f"{f.path}: {problem}")
        return p


class Layer:
    def __init__(self, get, be, i: int, dense: bool):
        # get(name): the tensor, its shape checked against the table (runtime.tensor_specs)
        t = lambda name: be.weight(get(f"blk.{i}.{name}.weight"))
        self.attn_norm = be.table(get(f"blk.{i}.attn_norm.weight"))
        self.ffn_norm = be.table(get(f"blk.{i}.ffn_norm.weight"))
        self.wq, self.wk, self.wv, self.wo = t("attn_q"), t("attn_k"), t("attn_v"), t("attn_output")
        self.dense = dense
        if dense:
            self.gate, self.up, self.down = t("ffn_gate"), t("ffn_up"), t("ffn_down")
        else:
            self.router = t("ffn_gate_inp")
            self.gate_exps, self.up_exps, self.down_exps = t("ffn_gate_exps"), t("ffn_up_exps"), t("ffn_down_exps")
            self.gate_sh, self.up_sh, self.down_sh = t("ffn_gate_shexp"), t("ffn_up_shexp"), t("ffn_down_shexp")


class LanguageModel:
    def __init__(self, f: GGUFFile, backend):
        self.file = f
        self.be = backend
        self.p = p = LMParams.from_gguf(f)
        shapes = lm_shapes(p)
        get = lambda name: f.tensor(name, shapes[name])
        self.token_embd = backend.weight(get("token_embd.weight"))
        self.output_norm = backend.table(get("output_norm.weight"))
        self.output = backend.weight(get("output.weight"))
        self.layers = [Layer(get, backend, i, i < p.n_dense) for i in range(p.n_layer)]

    def new_cache(self, n_ctx: int, f16: bool = True):
        return self.be.kv_cache(self.p.n_layer, n_ctx, self.p.n_embd, f16)

    def embed(self, ids) -> np.ndarray:
        return self.be.embed(self.token_embd, np.asarray(ids, np.int64))

    def forward(self, x, pos0: int, cache, logits_rows=None, tap: Tap | None = None):
        """x [m, H] embeddings of positions pos0..pos0+m-1 -> logits [r, V] for `logits_rows`
        (default: the last row; "all": every row). `tap` is handed the named intermediates (runtime.tap
        lists them)."""
        m = x.shape[0]
        rows = np.array([m - 1]) if logits_rows is None else np.arange(m) if isinstance(logits_rows, str) \
            else np.asarray(logits_rows)
        return self.forward_batch(x, [Segment(0, m, pos0, cache)], rows, tap)

    def forward_batch(self, x, segments: list[Segment], logits_rows=None, tap: Tap | None = None):
        """Several sequences in one forward: x [sum m, H] holds each segment's rows; attention is per
        segment over its own cache, every weight product runs over all rows at once. -> logits for
        `logits_rows` (default: each segment's last row), [r, V]."""
        be, p = self.be, self.p
        cb = callback(tap, be)
        m = x.shape[0]
        h = be.empty((m, p.n_embd))
        cb(x, "inp_embd")
        for i, layer in enumerate(self.layers):
            be.rmsnorm(x, layer.attn_norm, p.eps, h)
            cb(h, "attn_norm", i)
            be.add(x, self.attention(h, layer, segments, cb, i))
            cb(x, "ffn_inp", i)
            be.rmsnorm(x, layer.ffn_norm, p.eps, h)
            cb(h, "ffn_norm", i)
            ffn = self.mlp(*be.matmul_many(h, (layer.gate, layer.up)), layer.down) if layer.dense \
                else self.moe(h, layer, cb, i)
            cb(ffn, "ffn_out", i)
            be.add(x, ffn)
            cb(x, "l_out", i)
        rows = np.array([s.row0 + s.m - 1 for s in segments]) if logits_rows is None else logits_rows
        out = be.empty((len(rows), p.n_embd))
        be.rmsnorm(x if len(rows) == m and rows[0] == 0 else be.take_rows(x, rows), self.output_norm, p.eps, out)
        cb(out, "result_norm")
        logits = be.matmul(out, self.output)
        cb(logits, "result_output")
        return logits

    def attention(self, h, layer: Layer, segments: list[Segment], cb: Callback, il: int):
        # h [m, H] -> [m, H]; each segment's k, v go into its cache at its pos0, its queries attend there
        be, p = self.be, self.p
        q, k, v = be.matmul_many(h, (layer.wq, layer.wk, layer.wv))
        a = be.empty(q.shape)
        for s in segments:
            qs, ks, vs = (be.rows(t, s.row0, s.row0 + s.m) for t in (q, k, v))
            positions = np.arange(s.pos0, s.pos0 + s.m)
            be.rope(qs, p.n_head, positions, p.rope_theta)
            be.rope(ks, p.n_head, positions, p.rope_theta)
            kc, vc = s.cache[il]
            be.cache_store(ks, kc, s.pos0)
            be.cache_store(vs, vc, s.pos0)
            be.attention_causal(qs, kc, vc, s.pos0, p.n_head, be.rows(a, s.row0, s.row0 + s.m))
        cb(q, "Qcur", il)
        cb(k, "Kcur", il)
        cb(v, "Vcur", il)
        cb(a, "kqv_out", il)
        out = be.matmul(a, layer.wo)
        cb(out, "attn_out", il)
        return out

    def mlp(self, g, u, down):
        # down(silu(g) * u), g = gate h and u = up h
        self.be.silu_mul(g, u, g)
        return self.be.matmul(g, down)

    def moe(self, h, layer: Layer, cb: Callback, il: int):
        # sum_k w_k expert_k(h) + shared(h), experts picked per token by softmax(router h), top-k
        be, p = self.be, self.p
        m = h.shape[0]
        logits, g, u = be.matmul_many(h, (layer.router, layer.gate_sh, layer.up_sh))
        cb(logits, "ffn_moe_logits", il)
        idx, w = be.route(logits, p.n_expert_used)
        if p.expert_norm or p.expert_scale != 1.0:   # DeepSeek-OCR uses neither; other files may
            wh = be.to_host(w)
            wh = wh / wh.sum(axis=1, keepdims=True) if p.expert_norm else wh
            w = be.asarray(wh * np.float32(p.expert_scale))
        cb(idx, "ffn_moe_topk", il)
        cb(w, "ffn_moe_weights", il)
        out = self.mlp(g, u, layer.down_sh)
        cb(out, "ffn_shexp", il)
        if m <= PER_TOKEN_EXPERTS_MAX_ROWS:
            return self._experts_per_token(h, layer, idx, w, out)
        return self._experts_grouped(h, layer, be.to_host(idx), be.to_host(w), out)

    def _experts_per_token(self, h, layer: Layer, idx, w, out):
        # decode: each token's k experts, gate and up in one launch, down in one (ids stay on the backend)
        be = self.be
        g, u = be.matmul_many(h, (layer.gate_exps, layer.up_exps), idx)
        be.silu_mul(g, u, g)
        y = be.matmul_experts(g, layer.down_exps, idx, be.empty((g.shape[0], self.p.n_embd)))
        be.weighted_sum_into(out, y, w)
        return out

    def _experts_grouped(self, h, layer: Layer, idx: np.ndarray, w: np.ndarray, out):
        # prefill: the (token, slot) pairs sorted by expert (routing read on the host), so each expert's
        # weights are read once, every expert in one launch per projection
        be, k = self.be, self.p.n_expert_used
        order = np.argsort(idx.reshape(-1), kind="stable")
        starts = np.searchsorted(idx.reshape(-1)[order], np.arange(self.p.n_expert + 1))
        x = be.take_rows(h, order // k)
        g = be.expert_matmul(x, layer.gate_exps, starts)
        u = be.expert_matmul(x, layer.up_exps, starts)
        be.silu_mul(g, u, g)
        y = be.expert_matmul(g, layer.down_exps, starts)
        be.weighted_sum_into(out, be.take_rows(y, np.argsort(order)), w)   # back to (token, slot) order
        return out

"""Fast decoding: the one-token decode step compiled ahead of time, for `engine.generate(compile=True)`.

At the default model size a decode step is about a million multiply-adds, so in eager PyTorch
it costs what its ~100 operator calls cost, not what its arithmetic costs. Here the step is one
function over fused weights (q/k/v in one matrix, gate/up in one), exported with torch.export
and compiled by AOTInductor into a shared library: at batch 1 it becomes a single C++ loop nest
called once per token with no Python, dispatcher or guards in between.

Compiled steps are cached per model shape (ModelConfig, dtype, device), not per model: weights
and the KV cache are inputs, so a step compiled once serves every model of that shape and sees
weight updates. There are two per shape, compiled on first use (about 10-30 s each):
  - batch 1: every matmul written as a multiply-and-sum so inductor fuses the whole step into
    one loop nest;
  - any batch size (used for calls that start above 1): matmuls stay BLAS calls, which win once
    each weight is reused by several rows.
The attended cache length is dynamic too: each step attends to the filled prefix rounded up to
a multiple of `ATTEND_BLOCK`, so a step costs what the eager engine's does, not max_seq_len.

KV cache layout here is (max_len, B, n_kv_head, head_dim) per layer, sequence first, so that
the prefix a step attends to is a contiguous slice. The eager prefill writes into it through
permuted views, so prefill is exactly the eager engine's.
"""

import os
import tempfile
import warnings
import weakref
from dataclasses import astuple

import torch
import torch.nn.functional as F

from stagewise.model import KVCache, ModelConfig, Transformer, apply_rope

ATTEND_BLOCK = 16  # the attended prefix grows in blocks of this many slots; padding slots are masked


def fused_weights(model: Transformer) -> list[torch.Tensor]:
    """The step's weight inputs: per layer [attn norm, qkv, o, mlp norm, gate_up, down], then
    [embedding, final norm, lm_head, rope cos, rope sin]. Cats are copies, so rebuild after training."""
    out = []
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        out += [block.input_layernorm.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                a.o_proj.weight, block.post_attention_layernorm.weight,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    d = model.model
    out += [d.embed_tokens.weight, d.norm.weight, model.lm_head.weight, d.rope_cos, d.rope_sin]
    return [w.detach().contiguous() for w in out]


def _linear(x: torch.Tensor, w: torch.Tensor, fuse: bool) -> torch.Tensor:
    # (B, K) @ (N, K).T. As multiply-and-sum inductor generates the matrix-vector product
    # itself, fused with its neighbours, instead of calling BLAS (~4 us a call at batch 1).
    return (x[:, None, :] * w).sum(-1) if fuse else F.linear(x, w)


def decode_step(cfg: ModelConfig, fuse: bool, tok: torch.Tensor, slot: torch.Tensor, rpos: torch.Tensor,
                start: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step for a batch; the function that gets compiled (it also runs eagerly).

    tok (B,) the last tokens; slot () the cache slot to write; rpos (B,) their RoPE positions;
    start (B,) each row's first real slot (left padding before it). tensors: n_layer key caches
    and n_layer value caches (S, B, n_kv_head, hd) with S > slot, then `fused_weights`.
    Writes k/v at `slot` and advances slot and rpos by one, in place.
    Returns logits (B, V) and their argmax (B,).
    """
    L, nh, nkv, hd, C = cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
    kcs, vcs, w = tensors[:L], tensors[L:2 * L], tensors[2 * L:]
    emb, norm_w, head, cos_t, sin_t = w[6 * L:]
    B, S = tok.shape[0], kcs[0].shape[0]
    x = F.embedding(tok, emb)  # (B, C)
    cos, sin = cos_t[rpos][:, None, :], sin_t[rpos][:, None, :]  # (B, 1, hd)
    s = torch.arange(S, device=tok.device)
    # (S, B): written and not a pad. A pad query (only when the step itself fills a prompt) sees
    # itself, as in the engine's prefill: a row with nothing to attend to would give NaN.
    valid = ((s[:, None] >= start[None, :]) | (s[:, None] == slot)) & (s[:, None] <= slot)
    bias = torch.zeros(S, B, 1, 1, dtype=x.dtype, device=x.device).masked_fill(~valid[:, :, None, None], float("-inf"))
    for i in range(L):
        n1, wqkv, wo, n2, wgu, wd = w[6 * i:6 * i + 6]
        h = F.rms_norm(x, (C,), n1, cfg.norm_eps)
        q, k, v = _linear(h, wqkv, fuse).split([nh * hd, nkv * hd, nkv * hd], -1)
        q = apply_rope(q.view(B, nh, hd), cos, sin).view(B, nkv, nh // nkv, hd)
        k = apply_rope(k.view(B, nkv, hd), cos, sin)
        kcs[i].index_copy_(0, slot.view(1), k[None])
        vcs[i].index_copy_(0, slot.view(1), v.view(1, B, nkv, hd))
        # Attention for one query per row, over the S cached slots: (S, B, nkv, group)
        att = (q[None] * kcs[i][:, :, :, None, :]).sum(-1) * hd ** -0.5 + bias
        att = att.softmax(0)
        y = (att[..., None] * vcs[i][:, :, :, None, :]).sum(0)  # (B, nkv, group, hd)
        x = x + _linear(y.reshape(B, nh * hd), wo, fuse)
        h = F.rms_norm(x, (C,), n2, cfg.norm_eps)
        g, u = _linear(h, wgu, fuse).chunk(2, -1)
        x = x + _linear(F.silu(g) * u, wd, fuse)
    logits = _linear(F.rms_norm(x, (C,), norm_w, cfg.norm_eps), head, fuse)  # (B, V)
    slot.add_(1)
    rpos.add_(1)
    return logits, logits.argmax(-1)


class _Step(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, fuse: bool):
        super().__init__()
        self.cfg, self.fuse = cfg, fuse

    def forward(self, tok, slot, rpos, start, *tensors):
        return decode_step(self.cfg, self.fuse, tok, slot, rpos, start, *tensors)


_compiled: dict[tuple, object] = {}  # (config, dtype, device, batch 1?) -> AOTInductor runner


def compiled_step(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, single: bool):
    """The AOTInductor runner of `decode_step` for this model shape, compiled on first use.
    single: batch 1 (else any batch size). Call it as `runner.run([tok, slot, rpos, start, *tensors])`."""
    key = (astuple(cfg), dtype, str(device), single)
    if key not in _compiled:
        _compiled[key] = _compile(cfg, dtype, device, single)
    return _compiled[key]


def _compile(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, single: bool):
    B = 1 if single else 2
    M = -(-cfg.max_seq_len // ATTEND_BLOCK) * ATTEND_BLOCK
    # Export traces with ordinary tensors: inference tensors cannot be mutated outside inference mode.
    # The warnings filter hides torch's own deprecation notices from export and packaging.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        model = Transformer(cfg).to(device=device, dtype=dtype)
        caches = [torch.zeros(M, B, cfg.n_kv_head, cfg.head_dim, dtype=dtype, device=device)
                  for _ in range(2 * cfg.n_layer)]
        weights = fused_weights(model)
        rows = torch.zeros(B, dtype=torch.long, device=device)
        args = (rows, torch.tensor(1, device=device), rows + 1, rows.clone(), *caches, *weights)
        # Dynamic: the attended length S always, the batch size unless compiled for batch 1.
        S = torch.export.Dim("S", min=2, max=M)
        batch = None if single else torch.export.Dim("B", min=1)
        per_row = None if single else {0: batch}
        per_cache = {0: S} if single else {0: S, 1: batch}
        shapes = (per_row, None, per_row, per_row, tuple([per_cache] * len(caches) + [None] * len(weights)))
        program = torch.export.export(_Step(cfg, single), args, dynamic_shapes=shapes)
        # Generated loops run on one thread: each is a few microseconds of work, about what a
        # fork-join costs, and a second thread that has to wait for a busy core stalls every loop.
        # (BLAS calls in the batched step still use torch's threads.)
        options = {"cpp.threads": 1}
        with tempfile.TemporaryDirectory(prefix="stagewise_aoti_") as tmp:
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(tmp, "step.pt2"), inductor_configs=options)
            return torch._inductor.aoti_load_package(path).loader  # loaded into memory: the file may go


class FastDecoder:
    """Decode state for one `generate` call: the KV cache in step layout and the step's inputs.

    `prefill_cache()` is a KVCache for the eager prefill that writes into this layout; `step()`
    then advances every row by one token.
    """

    def __init__(self, model: Transformer, batch_size: int, max_len: int, starts: list[int], next_pos: list[int],
                 slot: int):
        cfg, p = model.cfg, model.lm_head.weight
        self.cfg, self.dtype, self.device = cfg, p.dtype, p.device
        self.max_len = -(-max_len // ATTEND_BLOCK) * ATTEND_BLOCK
        shape = (self.max_len, batch_size, cfg.n_kv_head, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layer)]
        self.slot = slot
        self.slot_t = torch.tensor(slot, device=p.device)
        self.rpos = torch.tensor(next_pos, device=p.device)
        self.start = torch.tensor(starts, device=p.device)
        self.weights = _cached_weights(model)
        self.single = batch_size == 1  # the batch-1 step; rows that finish later keep the other one
        self.runner = None
        self._views_len = 0

    def prefill_cache(self) -> KVCache:
        cache = KVCache.__new__(KVCache)
        cache.k = [t.permute(1, 2, 0, 3) for t in self.k]  # (B, nkv, max_len, hd) views
        cache.v = [t.permute(1, 2, 0, 3) for t in self.v]
        cache.max_len, cache.pos = self.max_len, 0
        return cache

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (as KVCache.select_rows)."""
        self.k = [t.index_select(1, rows) for t in self.k]
        self.v = [t.index_select(1, rows) for t in self.v]
        self.rpos, self.start = self.rpos.index_select(0, rows), self.start.index_select(0, rows)
        self._views_len = 0

    def step(self, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tok (B,) -> (logits (B, V), greedy next tokens (B,)); the cache advances by one slot."""
        if self.slot >= self._views_len:
            # Attend to the filled prefix, rounded up to a block, so the inputs change once a block.
            self._views_len = min(self.max_len, (self.slot // ATTEND_BLOCK + 1) * ATTEND_BLOCK)
            n = self._views_len
            self._inputs = [t[:n] for t in self.k] + [t[:n] for t in self.v] + self.weights
            if self.runner is None:
                self.runner = compiled_step(self.cfg, self.dtype, self.device, self.single)
        self.slot += 1
        return tuple(self.runner.run([tok, self.slot_t, self.rpos, self.start] + self._inputs))


# Fused weights per model, rebuilt when any parameter changed in place (its version counter moved).
_weights: "weakref.WeakKeyDictionary[Transformer, tuple]" = weakref.WeakKeyDictionary()


def _cached_weights(model: Transformer) -> list[torch.Tensor]:
    version = tuple(p._version for p in model.parameters()) + tuple(p.data_ptr() for p in model.parameters())
    hit = _weights.get(model)
    if hit is None or hit[0] != version:
        hit = (version, fused_weights(model))
        _weights[model] = hit
    return hit[1]

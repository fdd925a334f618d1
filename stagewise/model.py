"""The model: a Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Parameter names equal transformers' `LlamaForCausalLM` state_dict names one to one, and the
maths follows the same conventions (rotate-half RoPE, RMSNorm in fp32, no biases), so a
saved model loads in transformers with the same logits and a transformers Llama checkpoint
loads here. Everything a later stage needs from the architecture lives in this one file.
"""

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from stagewise.errors import StagewiseError


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    intermediate_size: int = 336
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise StagewiseError(f"model: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise StagewiseError(f"model: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise StagewiseError(f"model: head dimension n_embd/n_head ({self.n_embd // self.n_head}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_hf_config(self, bos_token_id: int | None, eos_token_id: int | list[int] | None,
                     pad_token_id: int | None) -> dict:
        """A config.json dict that transformers reads as a `LlamaConfig`."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            # transformers 5 reads rope settings from here; older versions read rope_theta.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
        }

    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelConfig":
        """The inverse of `to_hf_config`; also reads Llama config.json files written by transformers."""
        def need(key):
            if key not in d:
                raise StagewiseError(f"config.json: missing key '{key}'")
            return d[key]

        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, ok) != ok:
                raise StagewiseError(f"config.json: '{key}' is {d[key]!r}; this model supports only {ok!r}")
        if "rope_theta" in d:
            rope_theta = d["rope_theta"]
        elif isinstance(d.get("rope_parameters"), dict) and "rope_theta" in d["rope_parameters"]:
            if d["rope_parameters"].get("rope_type", "default") != "default":
                raise StagewiseError("config.json: only rope_type 'default' is supported")
            rope_theta = d["rope_parameters"]["rope_theta"]
        else:
            raise StagewiseError("config.json: missing key 'rope_theta'")
        n_head = need("num_attention_heads")
        cfg = cls(
            vocab_size=need("vocab_size"),
            n_layer=need("num_hidden_layers"),
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            n_embd=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            max_seq_len=need("max_position_embeddings"),
            rope_theta=float(rope_theta),
            norm_eps=float(need("rms_norm_eps")),
            tie_embeddings=bool(need("tie_word_embeddings")),
        )
        if d.get("head_dim") not in (None, cfg.head_dim):
            raise StagewiseError(f"config.json: head_dim {d['head_dim']} != hidden_size/num_attention_heads ({cfg.head_dim})")
        return cfg


class KVCache:
    """Preallocated keys and values for decoding: one (B, n_kv_head, max_len, head_dim) pair per layer.

    All rows share one fill position `pos` (the engine left-pads prompts so they end together);
    a forward pass with T new tokens writes slots pos..pos+T-1 of every layer, then advances pos.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, hd) at the current position; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, n_kv_head, end, hd)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished generations drop out so they cost nothing)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (max_seq_len, head_dim) for `apply_rope`.

    Rotate-half convention of transformers' Llama: dimension i pairs with i + hd/2 (not with
    i + 1), so q and k weights are interchangeable with transformers checkpoints.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # (hd/2,)
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)  # (T, hd)
    # The minus sign of rotate_half, (x1, x2) -> (-x2, x1), is folded into the first half of sin.
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)  # (T, hd)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hd) rotated by position: x * cos + rotate_half(x) * sin, where rotate_half is
    a roll by hd/2 with the sign carried by `sin` (one kernel instead of slice, neg and cat)."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (..., C) -> logits (..., V) = hidden @ weight^T, in fp32 under autocast too. bf16
    keeps 8 bits of mantissa, so a logit near 10 would be rounded by up to 0.03, and with it
    the probabilities of the tokens a copy or a name hinges on."""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), weight.float())


class LMHead(nn.Linear):
    """The output projection (`lm_head`, named and stored as an `nn.Linear`), in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_logits(x, self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        # No mask and T > 1 means plain training-style causal attention from position 0.
        # bf16 autocast on a CPU: the matmuls gain (AMX), but the bf16 attention kernel's backward
        # takes three times the fp32 one's, so attention runs in fp32 with autocast off.
        fp32 = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Decoder(nn.Module):
    """Embeddings, blocks and final norm: token ids (B, T) -> normed hidden states (B, T, C).

    Called directly (`model.model(idx)`) by heads other than the LM head, e.g. a reward model.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        cos, sin = rope_tables(cfg)
        # Not persistent: derived from the config, and transformers' checkpoints do not carry them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, *, kv_cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        # A row that packs several sequences behind one prompt (shared_prompt, which checks each
        # sequence's length) may be longer than max_seq_len; its positions are not.
        packed = positions is not None and kv_cache is None
        if not packed and start + T > self.cfg.max_seq_len:
            raise StagewiseError(f"model: sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise StagewiseError(f"model: {start + T} tokens do not fit a KV cache of {kv_cache.max_len}")
        if positions is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd)
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)  # (B, 1, T, hd)
        if attn_mask is None and start > 0 and T > 1:
            # SDPA's is_causal aligns the triangle top-left, which is wrong after a cached prefix.
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        x = self.embed_tokens(idx)  # (B, T, C)
        for block in self.layers:
            x = block(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, 0.02); projections that write into the residual stream are scaled by
        1/sqrt(2 * n_layer) so the residual's variance does not grow with depth (GPT-2)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, last_only: bool = False, supervised_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, V), or (logits, mean loss) when targets (B, T) are given.

        targets: next-token ids, -100 where no loss is taken.
        kv_cache: decode with this cache: the T tokens sit after the kv_cache.pos already cached.
        positions: (B, T) RoPE positions per token (left-padded batches); default pos..pos+T-1.
        attn_mask: bool, broadcastable to (B, n_head, T, S) with S = keys attended (cached + T),
            True where a query may attend; default causal.
        last_only: compute logits for the last position only, (B, 1, V), as a decoder needs.
        supervised_only: with targets, run the LM head only where a target is given and return
            those logits, (N, V): the same loss for less work when most positions carry none (an
            SFT batch's prompts). The number of positions varies from batch to batch, so this is
            for eager training.
        """
        x = self.model(idx, kv_cache=kv_cache, positions=positions, attn_mask=attn_mask)  # (B, T, C)
        if targets is not None and supervised_only:
            keep = targets != -100
            logits = self.lm_head(x[keep])  # (N, V)
            return logits, F.cross_entropy(logits.float(), targets[keep])
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (tied embeddings once); optionally without the token
        embedding table (which, when tied, is also the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight (the embedding
        lookup is not a matmul, the LM head is, tied or not) plus the attention score and
        value products, 12 * n_layer * n_head * head_dim * seq_len (PaLM appendix B)."""
        cfg = self.cfg
        T = cfg.max_seq_len if seq_len is None else seq_len
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state_dict (names, dtypes, shapes, bytes) in sorted name order."""
    model = getattr(model, "_orig_mod", model)  # the same hash for a torch.compile'd model
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

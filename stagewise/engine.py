"""The inference engine: batched generation with a KV cache, and log-probs of given responses.

It works on lists of token ids and knows nothing of tokenization or chat formats. Prompts are
left-padded so they all end at the same cache position: one prefill for the batch, then one
decode step per new token for the rows still running. With `compile=True` those decode steps run
through stagewise/fast_decode.py, a compiled step with the same results.
"""

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from stagewise.errors import StagewiseError
from stagewise.model import KVCache, Transformer
from stagewise.sampling import sample

# (step, logits (R, V), rows, generated) -> logits (R, V). See `generate`.
LogitsProcessor = Callable[[int, torch.Tensor, list[int], list[list[int]]], torch.Tensor]


def _check_ids(seqs: list[list[int]], what: str, vocab_size: int, allow_empty: bool) -> None:
    for i, s in enumerate(seqs):
        if not allow_empty and len(s) == 0:
            raise StagewiseError(f"engine: {what} {i} is empty; it needs at least one token")
        for t in s:
            if not 0 <= t < vocab_size:
                raise StagewiseError(f"engine: {what} {i} has token id {t}, outside the vocabulary [0, {vocab_size})")


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Iterable[int] = (), seed: int | None = None,
             logits_processor: LogitsProcessor | None = None, compile: bool = False) -> list[list[int]]:
    """Continue each prompt; return the new tokens of each, in prompt order.

    A row stops at the first token in `stop_ids`, which is kept as its last token, or after
    `max_new_tokens`. So a response ended by a stop token iff `out and out[-1] in stop_ids`.
    temperature 0 is greedy; otherwise sampling with optional top-k / top-p. With `seed`, sampling
    uses its own generator and the output is reproducible; without, torch's global RNG.

    logits_processor, if given, is called once per step before sampling as
        logits_processor(step, logits, rows, generated) -> logits
    step: 0 for the first new token. logits: (R, V) float, one row per running prompt.
    rows: the prompt index (into `prompts`) of each logits row; finished prompts drop out.
    generated: the new tokens so far of every prompt, indexed by prompt (read it, don't change
    it): at step s the token chosen at step s-1 for prompt r is generated[r][-1], which is how a
    grammar matcher advances. Return (R, V) logits to sample from; set forbidden tokens to -inf
    (editing `logits` in place and returning it is fine). A row must keep some finite logit.

    compile=True runs the decode steps through `fast_decode` (an AOTInductor-compiled step, several
    times faster at small batch) with the same options and results: its logits differ from the
    eager ones only by float rounding (summation order), so only a near-tie could pick another
    token. The first call per model shape and batch kind (1, or more) compiles for 10-30 s; later
    calls, at any batch size and with any weights of that shape, reuse it.
    """
    if not prompts:
        return []
    base = getattr(model, "_orig_mod", model)  # a torch.compile'd model runs; its config lives here
    cfg = base.cfg
    _check_ids(prompts, "prompt", cfg.vocab_size, allow_empty=False)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    B, P = len(prompts), max(lengths)
    if P + max_new_tokens > cfg.max_seq_len:
        raise StagewiseError(f"engine: longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_seq_len {cfg.max_seq_len}")
    stop = set(stop_ids)
    device = base.lm_head.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    idx = torch.tensor([[0] * (P - n) + p for p, n in zip(prompts, lengths)], dtype=torch.long, device=device)
    if compile:
        from stagewise.fast_decode import FastDecoder
        fast = FastDecoder(base, B, P + max_new_tokens, starts=[P - n for n in lengths], next_pos=lengths, slot=P)
        cache = fast.prefill_cache()  # the eager prefill writes into the compiled step's cache layout
    else:
        cache = KVCache(cfg, B, P + max_new_tokens, dtype=base.lm_head.weight.dtype, device=device)
    padded = min(lengths) != P
    if padded:
        # valid[b, s]: may cache slot s be attended to? Pads never; generated slots always.
        valid = torch.ones(B, P + max_new_tokens, dtype=torch.bool, device=device)
        for b, n in enumerate(lengths):
            valid[b, :P - n] = False
        positions = (valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)  # (B, P) real tokens from 0
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        # A pad query sees only itself: its output is unused, but a row with nothing to attend gives NaN.
        mask = (causal & valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)  # (B, P, P)
        logits = model(idx, kv_cache=cache, positions=positions, attn_mask=mask[:, None], last_only=True)
        next_pos = torch.tensor(lengths, device=device)  # (B,) RoPE position of the next token
    else:
        logits = model(idx, kv_cache=cache, last_only=True)
    logits = logits[:, -1]  # (B, V)

    rows = list(range(B))
    out: list[list[int]] = [[] for _ in range(B)]
    greedy = None  # the compiled step's own argmax, used when decoding is plain greedy
    for step in range(max_new_tokens):
        if greedy is not None and temperature == 0 and logits_processor is None:
            tok = greedy  # what sample() would pick, without another operator call
        else:
            if logits_processor is not None:
                logits = logits_processor(step, logits, rows, out)
            tok = sample(logits, temperature, top_k, top_p, generator)  # (R,)
        keep = []
        for j, (r, t) in enumerate(zip(rows, tok.tolist())):
            out[r].append(t)
            if t not in stop:
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            # Finished rows leave the batch: smaller matmuls from here on.
            keep_t = torch.tensor(keep, device=device)
            rows = [rows[j] for j in keep]
            tok = tok.index_select(0, keep_t)
            if compile:
                fast.select_rows(keep_t)
            else:
                cache.select_rows(keep_t)
                if padded:
                    valid, next_pos = valid.index_select(0, keep_t), next_pos.index_select(0, keep_t)
        if compile:
            logits, greedy = fast.step(tok)  # (R, V), (R,)
        elif padded:
            S = cache.pos + 1
            logits = model(tok[:, None], kv_cache=cache, positions=next_pos[:, None],
                           attn_mask=valid[:, None, None, :S])[:, -1]  # mask (R, 1, 1, S)
            next_pos += 1
        else:
            logits = model(tok[:, None], kv_cache=cache)[:, -1]  # (R, V)
    return out


def sequence_logprobs(model: Transformer, prompts: list[list[int]], responses: list[list[int]],
                      *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each response token given its prompt and the response before it.

    Returns (logprobs, mask), both (B, R) with R the longest response: logprobs[b, j] is
    log p(responses[b][j] | prompts[b] + responses[b][:j]) for j < len(responses[b]), 0 after;
    mask is True on real tokens. The sequence log-prob is `logprobs.sum(-1)`. Logits are divided
    by `temperature` first (match the sampling temperature in PPO). Gradients flow when enabled,
    so the same call serves training (PPO/DPO) and evaluation (wrap it in torch.no_grad()).
    """
    if len(prompts) != len(responses):
        raise StagewiseError(f"engine: {len(prompts)} prompts but {len(responses)} responses")
    base = getattr(model, "_orig_mod", model)
    cfg = base.cfg
    _check_ids(prompts, "prompt", cfg.vocab_size, allow_empty=False)
    _check_ids(responses, "response", cfg.vocab_size, allow_empty=True)
    device = base.lm_head.weight.device
    B = len(prompts)
    seqs = [p + r for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    if T > cfg.max_seq_len:
        raise StagewiseError(f"engine: prompt + response of {T} tokens exceeds max_seq_len {cfg.max_seq_len}")
    R = max(len(r) for r in responses)
    # Right padding: real tokens start at position 0 and pads come after them, so the plain
    # causal mask is already right and no attention mask is needed.
    idx = torch.tensor([s + [0] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)  # (B, T)
    targets = torch.tensor([r + [-100] * (R - len(r)) for r in responses], dtype=torch.long, device=device)  # (B, R)
    mask = targets != -100
    # The LM head runs only where a response token is predicted: position t predicts token t+1,
    # so row b's response is predicted from columns len(prompt) - 1 onwards.
    hidden = base.model(idx)  # (B, T, C)
    start = torch.tensor([len(p) - 1 for p in prompts], device=device)
    cols = (start[:, None] + torch.arange(R, device=device)[None, :]).clamp(max=T - 1)  # (B, R)
    logits = base.lm_head(hidden.gather(1, cols[..., None].expand(B, R, hidden.size(-1))))  # (B, R, V)
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                          reduction="none").view(B, R)  # 0 where ignored
    logprobs = -nll
    return logprobs, mask

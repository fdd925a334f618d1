"""Batches for training: packed sequences for pre-training, padded examples for fine-tuning.

Both are deterministic for a seed and resumable: their whole position is a small dict
(`state_dict`) that a checkpoint stores, so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

import torch


def pack(documents: list[list[int]], separator: int) -> torch.Tensor:
    """Concatenate tokenized documents into one stream, each followed by `separator`."""
    flat: list[int] = []
    for ids in documents:
        flat.extend(ids)
        flat.append(separator)
    return torch.tensor(flat, dtype=torch.long)


class PackedBatches:
    """Windows of seq_len + 1 tokens cut from one token stream, in a shuffled order that is
    redrawn every epoch. Each batch is (inputs, targets), both (batch_size, seq_len)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < batch_size:
            raise ValueError(f"{len(tokens)} tokens make {self.n_windows} windows of {seq_len}, "
                             f"fewer than one batch of {batch_size}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.offsets = torch.arange(seq_len + 1)
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_windows, generator=g)

    def __len__(self) -> int:
        """Batches per epoch (a partial last batch is dropped)."""
        return self.n_windows // self.batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        windows = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        chunk = self.tokens[windows[:, None] * self.seq_len + self.offsets]  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order(self.epoch)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping windows of seq_len + 1 tokens for evaluation: (N, T + 1).
    A stream shorter than one window gives one window of the whole stream."""
    if len(tokens) < 2:
        raise ValueError("need at least two tokens to evaluate next-token loss")
    if len(tokens) <= seq_len:
        return tokens[None, :]
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    starts = torch.arange(n) * seq_len
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]


def targets_from_mask(ids: list[int], mask: list[bool]) -> list[int]:
    """Next-token targets for a sequence, -100 wherever the next token is not trained on."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


class IndexBatches:
    """Batches of indices into n items, reshuffled every epoch; a partial last batch is
    dropped. The position is (epoch, cursor), so checkpoints can resume it exactly.

    With `lengths`, batches group items of similar length (as `group_by_length` does in
    transformers): each run of `megabatch` shuffled batches is sorted by length and cut into
    batches, whose order is shuffled again. Right padding then costs little compute while each
    batch still draws from a random slice of the data."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None, megabatch: int = 50):
        if n < batch_size:
            raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} items")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths, self.megabatch = lengths, megabatch
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return order
        size = self.batch_size * self.megabatch
        order = [i for start in range(0, self.n, size)
                 for i in sorted(order[start:start + size], key=self.lengths.__getitem__, reverse=True)]
        full = self.n // self.batch_size * self.batch_size
        batches = [order[b:b + self.batch_size] for b in range(0, full, self.batch_size)]
        shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return [i for batch in shuffled for i in batch] + order[full:]

    def __len__(self) -> int:
        return self.n // self.batch_size

    def next(self) -> list[int]:
        if self.cursor + self.batch_size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        batch = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order(self.epoch)


def pad_right(rows: list[list[int]], pad: int, multiple: int = 1) -> torch.Tensor:
    """(B, T) with each row left-aligned and padded on the right to a multiple of `multiple`."""
    width = max(len(r) for r in rows)
    width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class ExampleBatches:
    """Whole examples, one per row, right-padded to the longest in the batch (rounded up to a
    multiple of `pad_multiple` so a compiled model sees few distinct shapes; `group_by_length`
    batches examples of similar length together). Examples never
    attend to each other: each row is one example and padding comes after it, so the plain
    causal mask is exact. Shuffled every epoch; resumable like PackedBatches."""

    def __init__(self, examples: list[tuple[list[int], list[bool]]], batch_size: int, seed: int, pad_id: int,
                 pad_multiple: int = 16, group_by_length: bool = False):
        self.examples = [(ids, targets_from_mask(ids, mask)) for ids, mask in examples]
        lengths = [len(ids) for ids, _ in examples] if group_by_length else None
        self.index = IndexBatches(len(examples), batch_size, seed, lengths)
        self.pad_id, self.pad_multiple = pad_id, pad_multiple

    def __len__(self) -> int:
        return len(self.index)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in self.index.next()]
        x = pad_right([ids for ids, _ in rows], self.pad_id, self.pad_multiple)
        y = pad_right([targets for _, targets in rows], -100, self.pad_multiple)
        return x, y

    def state_dict(self) -> dict:
        return self.index.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)

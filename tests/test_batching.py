"""Batches: packed windows shift targets and cover an epoch; example batches group by length; state resumes."""

import random

import torch

from stagewise.batching import ExampleBatches, IndexBatches, PackedBatches, eval_windows, pack


def test_pack_separates_documents():
    assert pack([[5, 6], [7]], separator=0).tolist() == [5, 6, 0, 7, 0]


def test_windows_shift_and_cover_an_epoch():
    tokens = torch.arange(101)
    batches = PackedBatches(tokens, seq_len=10, batch_size=2, seed=0)
    seen = []
    for _ in range(len(batches)):
        x, y = batches.next()
        assert torch.equal(y, x + 1)
        seen += x[:, 0].tolist()
    assert sorted(seen) == list(range(0, 100, 10))


def test_state_resumes_the_same_stream():
    tokens = torch.arange(1000)
    a = PackedBatches(tokens, seq_len=7, batch_size=3, seed=1)
    for _ in range(50):
        a.next()
    b = PackedBatches(tokens, seq_len=7, batch_size=3, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(100):
        assert torch.equal(a.next()[0], b.next()[0])


def test_eval_windows_predict_every_token_once():
    windows = eval_windows(torch.arange(21), seq_len=5)
    assert windows.shape == (4, 6)
    assert torch.cat([w[1:] for w in windows]).tolist() == list(range(1, 21))


def test_a_short_stream_is_one_window():
    assert eval_windows(torch.arange(5), seq_len=10).tolist() == [[0, 1, 2, 3, 4]]


def test_grouped_batches_are_a_shuffle_of_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    plain = IndexBatches(1000, 10, seed=3)
    grouped = IndexBatches(1000, 10, seed=3, lengths=lengths, megabatch=20)
    epoch = [grouped.next() for _ in range(len(grouped))]
    assert sorted(i for batch in epoch for i in batch) == list(range(1000))

    def spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(epoch) < spread([plain.next() for _ in range(len(plain))]) / 5
    # Batches are not in length order: long and short ones alternate through the epoch.
    means = [sum(lengths[i] for i in b) / len(b) for b in epoch]
    assert means != sorted(means) and means != sorted(means, reverse=True)

    resumed = IndexBatches(1000, 10, seed=3, lengths=lengths, megabatch=20)
    resumed.load_state_dict({"epoch": 0, "cursor": 500})
    assert [resumed.next() for _ in range(50)] == epoch[50:]


def test_grouped_examples_are_padded_to_their_batch_only():
    examples = [([1] * n, [False] + [True] * (n - 1)) for n in [3, 40, 4, 41, 5, 42, 6, 43]]
    batches = ExampleBatches(examples, 2, seed=0, pad_id=0, pad_multiple=1, group_by_length=True)
    widths = sorted(batches.next()[0].shape[1] for _ in range(4))
    assert widths == [4, 6, 41, 43]

"""Packed batches: targets are inputs shifted by one, epochs cover every window, state resumes."""

import torch

from stagewise.batching import PackedBatches, eval_windows, pack


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

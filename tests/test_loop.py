"""The generic training loop: in memory and streamed through a shuffle buffer."""

import numpy as np
import torch

from tests.conftest import write_synthetic_cache
from vlaug import cache, loop


def _streamed(feats, rows, labels, batch_rows=25):
    def chunks():
        for pos, emb in cache.take_rows(cache.iter_embeddings(feats, batch_rows=batch_rows), rows):
            yield torch.as_tensor(emb), torch.as_tensor(labels[rows[pos]])
    return chunks


def test_streaming_through_a_small_shuffle_buffer(tmp_path):
    feats = write_synthetic_cache(tmp_path / "big", n_per_class=60, d=16, n_classes=3)
    labels = cache.read_cache(feats).labels
    rows = np.arange(len(labels))
    seen = []

    def loss_fn(m, x, y):
        if m.training:
            seen.append(len(x))
        return torch.nn.functional.cross_entropy(m(x), y), {}

    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        module = torch.nn.Linear(16, 3)
        seen.clear()
        loop.fit_streamed(module, loss_fn, train_chunks=_streamed(feats, rows[::2], labels),
                          val_chunks=_streamed(feats, rows[1::2], labels), epochs=2, batch_size=8, buffer_rows=32,
                          generator=torch.Generator().manual_seed(0))
        weights.append(module.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])  # same seed, same result
    assert sum(seen) == 2 * 180 and max(seen) == 8  # every training row in each of the 2 epochs, batches of 8


def _shuffled_by_concatenation(chunks, batch_size, buffer_rows, generator):
    """The shuffle buffer's reference: hold the chunks, concatenate them for each draw."""
    buf_x, buf_y, held = [], [], 0

    def drain(final):
        x, y = torch.cat(buf_x), torch.cat(buf_y)
        order = torch.randperm(len(x), generator=generator)
        stop = len(x) if final else len(x) - len(x) % batch_size
        for start in range(0, stop, batch_size):
            yield x[order[start : start + batch_size]], y[order[start : start + batch_size]]
        return [x[order[stop:]]], [y[order[stop:]]]

    for xb, yb in chunks:
        buf_x.append(xb)
        buf_y.append(yb)
        held += len(xb)
        if held > buffer_rows:
            buf_x, buf_y = yield from drain(final=False)
            held = len(buf_x[0])
    if held:
        yield from drain(final=True)


def _streamed_batches(chunks, batch_size, buffer_rows, epochs=2):
    """The training batches fit_streamed draws from ``chunks`` (seed 0)."""
    batches = []

    def loss_fn(m, x, y):
        if m.training:
            batches.append((x.clone(), y.clone()))
        return m(x).square().mean(), {}

    loop.fit_streamed(torch.nn.Linear(4, 1), loss_fn, train_chunks=lambda: iter(chunks), val_chunks=None, epochs=epochs,
                      batch_size=batch_size, buffer_rows=buffer_rows, generator=torch.Generator().manual_seed(0))
    return batches


def test_the_shuffle_buffer_draws_the_batches_of_concatenated_chunks():
    gen = torch.Generator().manual_seed(1)
    sizes = [7, 0, 25, 3, 40, 1, 12, 9, 30]
    chunks = [(torch.randn(m, 4, generator=gen), torch.randint(0, 5, (m,), generator=gen)) for m in sizes]
    for batch_size, buffer_rows in [(8, 32), (8, 5), (16, 10), (4, 1000), (8, 27)]:
        batches = _streamed_batches(chunks, batch_size, buffer_rows)
        reference = torch.Generator().manual_seed(0)
        expected = [b for _ in range(2) for b in _shuffled_by_concatenation(chunks, batch_size, buffer_rows, reference)]
        assert len(batches) == len(expected) and sum(len(x) for x, _ in batches) == 2 * sum(sizes)
        for (x, y), (ex, ey) in zip(batches, expected):
            assert torch.equal(x, ex) and torch.equal(y, ey), (batch_size, buffer_rows)


def test_the_epoch_with_the_lowest_validation_loss_is_kept():
    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 2
    val_losses = iter([3.0, 1.0, 2.0, 4.0])
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 2)
    states = []

    def loss_fn(m, xb, yb):
        return torch.nn.functional.cross_entropy(m(xb), yb), {}

    def val_loss():
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(val_losses)

    history, selected = loop.fit_batches(module, loss_fn, train_batches=lambda: iter([(x, y)]), val_loss=val_loss,
                                         epochs=4, lr=0.1)
    assert selected == 2 and [h["val_loss"] for h in history] == [3.0, 1.0, 2.0, 4.0]
    assert all(torch.equal(module.state_dict()[k], states[1][k]) for k in states[1])  # epoch 2's weights
    assert not all(torch.equal(module.state_dict()[k], states[3][k]) for k in states[3])

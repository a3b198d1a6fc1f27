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

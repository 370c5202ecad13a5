"""A ``path/to/script.py:factory`` script for ``fqt variance``: ``make`` returns a small MLP,
its loss and three batches; ``wrong`` returns a malformed tuple (the error path)."""

SOURCE = '''
import torch
import torch.nn.functional as F


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    return model, (lambda m, b: F.cross_entropy(m(b[0]), b[1])), batches


def wrong():
    return make()[:2]
'''

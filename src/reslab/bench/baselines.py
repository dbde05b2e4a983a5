"""What reslab is measured against: the textbook eager fp32 training loop, the usual CIFAR DataLoader pipeline
with per-sample transforms, and synthetic inputs."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# both sides train at the paper's lr with its momentum and weight decay: same arithmetic, and a stable loss
# (a diverging one would time NaN/denormal arithmetic on the CPU)
LR = 0.1


def plain_step(model, batches, device):
    """The baseline's training step: the textbook eager loop (fp32, contiguous, SGD)."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    def step():
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def synthetic(batch, size, num_classes, device, mem=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=mem)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return itertools.repeat((x, y))


def forever(loader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:  # an empty epoch would otherwise spin forever
            raise ValueError("the loader yields no batches (fewer examples than one batch?)")


def baseline_batches(x, y, batch, device):
    """The common CIFAR pipeline: PIL images, per-sample RandomCrop(32, padding=4) + flip + ToTensor +
    Normalize, a DataLoader with 2 workers."""
    import torchvision.transforms as T
    from PIL import Image

    class DS(torch.utils.data.Dataset):
        def __init__(self):
            self.x, self.y = x.permute(0, 2, 3, 1).numpy(), y
            self.t = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.t(Image.fromarray(self.x[i])), int(self.y[i])

    dl = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=2, drop_last=True,
                                     persistent_workers=True, pin_memory=device.type == "cuda")
    while True:
        for xb, yb in dl:
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)



"""PyTorch side of bench/cnn_vs_pytorch.sh and bench/gpu.sh: ResNet-18 written out by hand in
torchvision's layout (one input channel, four classes, dropout 0.3 before the classifier, as
mica's), the same random input and the same AdamW step as mica's bench_cnn. Prints one JSON line.

    python bench/torch_resnet18.py [--device cpu|cuda] [--size 128] [--batch 32] [--steps 10]
                                   [--infer-batches 10] [--threads N]
"""
import argparse, json, os, resource, time

import torch, torch.nn as nn, torch.nn.functional as F


class Block(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); s.bn1 = nn.BatchNorm2d(cout)
        s.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); s.bn2 = nn.BatchNorm2d(cout)
        s.down = None
        if stride != 1 or cin != cout:
            s.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(s, x):
        idt = x if s.down is None else s.down(x)
        y = F.relu(s.bn1(s.conv1(x)))
        return F.relu(s.bn2(s.conv2(y)) + idt)


class ResNet18(nn.Module):
    def __init__(s, classes=4):
        super().__init__()
        s.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False); s.bn1 = nn.BatchNorm2d(64)
        s.pool = nn.MaxPool2d(3, 2, 1)
        cfg = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        s.layers = nn.Sequential(*[nn.Sequential(Block(a, b, st), Block(b, b, 1)) for a, b, st in cfg])
        s.drop = nn.Dropout(0.3); s.fc = nn.Linear(512, classes)

    def forward(s, x):
        x = s.pool(F.relu(s.bn1(s.conv1(x))))
        x = s.layers(x)
        return s.fc(s.drop(x.mean((2, 3))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--infer-batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cpu = lambda: sum(os.times()[:2])

    m = ResNet18().to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
    x = (torch.rand(a.batch, 1, a.size, a.size) - 0.5).to(dev)
    y = (torch.arange(a.batch) % 4).to(dev)
    times = []
    m.train()
    for s in range(a.steps + 1):
        if s == 1:
            wall0, cpu0 = time.perf_counter(), cpu()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward(); opt.step()
        loss.item()
        sync()
        if s > 0:
            times.append(time.perf_counter() - t0)
    train_cores = (cpu() - cpu0) / (time.perf_counter() - wall0)
    m.eval()
    with torch.no_grad():
        m(x).cpu()
        t0, c0 = time.perf_counter(), cpu()
        for _ in range(a.infer_batches):
            m(x).cpu()
        secs = time.perf_counter() - t0
    out = {"framework": f"pytorch-{torch.__version__}", "device": a.device, "model": "resnet18",
           "size": a.size, "batch": a.batch,
           "train_step_ms": round(1000 * sum(times) / len(times), 2),
           "train_cpu_cores": round(train_cores, 2),
           "infer_images_per_s": round(a.infer_batches * a.batch / secs, 2),
           "infer_cpu_cores": round((cpu() - c0) / secs, 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

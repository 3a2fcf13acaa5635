#!/usr/bin/env python3
"""wae-edge's GPU path against PyTorch on the same network with the same weights.

    python3 scripts/peer_torch.py --model wae-vgg16=peer/wae-vgg16.safetensors \\
        --model fashion-wae=models/fashion-wae/model.safetensors [--batch 1 8] [--json rows.json]

Needs only PyTorch (no numpy, no safetensors package): the GPU machine has it and no network.

1. The network is built from the model file alone: tensor names and shapes give the layers, the
   config stored in the file gives the kind (plain, naive half, Haar, WAE) and the pooling. It is
   the same inference path as runtime/model/mod.rs: split -> backbone on I_L -> quarter-width
   branch on I_H -> head_low(F_L) + head_fuse(concat(F_L, F_H)).
2. Logits check: 8 seeded inputs go through PyTorch and through `wae-edge logits` (the CPU
   engine, f32); the largest absolute difference divided by the largest |logit| must stay within
   --tolerance (non-zero exit otherwise).
3. Timing, per batch, on CUDA: f16, channels_last, cudnn.benchmark. One iteration is what a frame
   costs in wae-edge's graph runner: copy the input in, run, copy the logits out (synchronised).
   "eager" runs the module; "graph" replays a torch.cuda.CUDAGraph captured after warm-up.
   gpu_ms is the median time between CUDA events recorded around the forward pass or replay.
   Medians over --seconds per mode. On the CPU (a check without a GPU) only eager runs, in f32.
Rows go to --json in the schema of docs/gpu-results.json (engine "torch").
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

BIN = os.environ.get("WAE_EDGE_BIN", "target/release/wae-edge")

DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16"}


def read_model(path):
    """(config dict, {name: float32 tensor}) from a wae-edge safetensors file."""
    import torch

    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {}) or {}
    if "wae_edge.config" not in meta:
        sys.exit(f"{path}: not a wae-edge model (no wae_edge.config metadata)")
    config = json.loads(meta["wae_edge.config"])
    data = bytearray(raw[8 + n :])
    tensors = {}
    for name, t in header.items():
        lo, hi = t["data_offsets"]
        dt = getattr(torch, DTYPES[t["dtype"]])
        count = (hi - lo) // torch.empty(0, dtype=dt).element_size()
        v = torch.frombuffer(data, dtype=dt, count=count, offset=lo) if count else torch.empty(0, dtype=dt)
        tensors[name] = v.reshape(t["shape"]).float()
    return config, tensors


def stack(tensors, prefix):
    """[[(weight, bias), ...] per stage] for `prefix.s{s}.c{i}`."""
    stages = []
    s = 0
    while f"{prefix}.s{s}.c0.weight" in tensors:
        convs, i = [], 0
        while f"{prefix}.s{s}.c{i}.weight" in tensors:
            convs.append(conv_params(tensors, f"{prefix}.s{s}.c{i}"))
            i += 1
        stages.append(convs)
        s += 1
    return stages


def conv_params(tensors, p):
    """(weight, bias) of a conv, with an eval-mode batch norm at `p.bn` folded in."""
    w, b = tensors[f"{p}.weight"], tensors.get(f"{p}.bias")
    if b is None:
        b = w.new_zeros(w.shape[0])
    if f"{p}.bn.weight" in tensors:
        g, beta = tensors[f"{p}.bn.weight"], tensors[f"{p}.bn.bias"]
        mean, var = tensors[f"{p}.bn.running_mean"], tensors[f"{p}.bn.running_var"]
        scale = g / (var + 1e-5).sqrt()
        w = w * scale.reshape(-1, 1, 1, 1)
        b = (b - mean) * scale + beta
    return w, b


def head(tensors, prefix):
    layers, i = [], 0
    while f"{prefix}.fc{i}.weight" in tensors:
        layers.append((tensors[f"{prefix}.fc{i}.weight"], tensors[f"{prefix}.fc{i}.bias"]))
        i += 1
    return layers


def build(config, tensors):
    """The inference network as a torch.nn.Module."""
    import torch
    import torch.nn.functional as F

    kind = config["arch"]["kind"]
    ceil = config["arch"]["pool_ceil"]
    c = config["input"]["channels"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterList()
            # Layers keep indices into self.params, not the tensors: moving the module to
            # another device or dtype may replace the Parameter objects.
            def P(t):
                self.params.append(torch.nn.Parameter(t, requires_grad=False))
                return len(self.params) - 1

            def pair(wb):
                return P(wb[0]), P(wb[1])

            self.backbone = [[pair(wb) for wb in st] for st in stack(tensors, "backbone")]
            self.branch = [[pair(wb) for wb in st] for st in stack(tensors, "branch")]
            self.head_low = [pair(wb) for wb in head(tensors, "head_low")]
            self.head_fuse = [pair(wb) for wb in head(tensors, "head_fuse")]
            self.encoder, i = [], 0
            while f"encoder.conv{i}.weight" in tensors:
                self.encoder.append(pair(conv_params(tensors, f"encoder.conv{i}")))
                i += 1
            if kind == "wae":
                self.low = pair(conv_params(tensors, "encoder.low"))
                self.high = pair(conv_params(tensors, "encoder.high"))
            if kind == "haar":
                k = torch.zeros(4 * c, c, 2, 2)
                bands = [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
                for b, band in enumerate(bands):
                    for ch in range(c):
                        k[b * c + ch, ch] = torch.tensor(band, dtype=torch.float32).reshape(2, 2) * 0.5
                self.haar = P(k)

        def p(self, i):
            return self.params[i]

        def split(self, x):
            if kind == "plain":
                return x, None
            if kind == "naive-half":
                return F.avg_pool2d(x, 2), None
            if kind == "haar":
                bands = F.conv2d(x, self.p(self.haar), stride=2)
                return bands[:, :c], bands[:, c:]
            h = x
            for w, b in self.encoder:
                h = F.relu(F.conv2d(h, self.p(w), self.p(b), padding=1))
            return (F.conv2d(h, self.p(self.low[0]), self.p(self.low[1]), stride=2, padding=1),
                    F.conv2d(h, self.p(self.high[0]), self.p(self.high[1]), stride=2, padding=1))

        def vgg(self, x, stages):
            for st in stages:
                for w, b in st:
                    x = F.relu(F.conv2d(x, self.p(w), self.p(b), padding=1))
                x = F.max_pool2d(x, 2, ceil_mode=ceil)
            return x

        def mlp(self, x, layers):
            x = x.flatten(1)
            for i, (w, b) in enumerate(layers):
                x = F.linear(x, self.p(w), self.p(b))
                if i + 1 < len(layers):
                    x = F.relu(x)
            return x

        def forward(self, x):
            low, high = self.split(x)
            f_low = self.vgg(low, self.backbone)
            logits = self.mlp(f_low, self.head_low)
            if high is not None and self.branch:
                f_high = self.vgg(high, self.branch)
                logits = logits + self.mlp(torch.cat([f_low, f_high], 1), self.head_fuse)
            return logits

    if kind not in ("plain", "naive-half", "haar", "wae"):
        sys.exit(f"unknown model kind {kind!r}")
    return Net().eval()


def reference_logits(path, x):
    """`wae-edge logits` (CPU engine) of a float32 [N, C, H, W] tensor."""
    import torch

    with tempfile.TemporaryDirectory() as d:
        xin, yout = os.path.join(d, "x.f32"), os.path.join(d, "y.f32")
        with open(xin, "wb") as f:
            f.write(f32_bytes(x))
        subprocess.run([BIN, "logits", "--model", path, "--input", xin, "-o", yout], check=True)
        with open(yout, "rb") as f:
            y = bytearray(f.read())
    return torch.frombuffer(y, dtype=torch.float32).reshape(x.shape[0], -1).clone()


def f32_bytes(x):
    """Little-endian f32 bytes of a CPU tensor, with or without numpy."""
    import torch

    x = x.to(torch.float32).contiguous()
    try:
        return x.numpy().tobytes()
    except (ImportError, RuntimeError):
        return bytes(x.view(torch.uint8).reshape(-1).tolist())


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def time_mode(step, seconds, min_iters=20):
    """Median wall ms of `step()` and median ms from its own events (or None)."""
    for _ in range(5):
        step()
    walls, gpus = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(walls) < min_iters:
        t = time.perf_counter()
        g = step()
        walls.append((time.perf_counter() - t) * 1e3)
        if g is not None:
            gpus.append(g)
    return median(walls), (median(gpus) if gpus else None)


def bench(net, shape, device, seconds):
    """[(mode, p50_ms, gpu_ms)] for one batch shape."""
    import torch

    if device == "cpu":
        x = torch.randn(shape)

        def step():
            net(x)

        with torch.inference_mode():
            p50, _ = time_mode(step, seconds)
        return [("eager", p50, None)]

    dt = torch.float16
    host = torch.randn(shape).to(dt).pin_memory()
    static_in = torch.empty(shape, dtype=dt, device="cuda").to(memory_format=torch.channels_last)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def eager():
        with torch.inference_mode():
            static_in.copy_(host, non_blocking=True)
            start.record()
            y = net(static_in)
            stop.record()
            y.float().cpu()
        return start.elapsed_time(stop)

    rows = [("eager",) + time_mode(eager, seconds)]

    # Capture after warm-up on a side stream, as torch.cuda.graphs documents.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.inference_mode():
        for _ in range(3):
            net(static_in)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        with torch.cuda.graph(g):
            static_out = net(static_in).float()

    def graph():
        static_in.copy_(host, non_blocking=True)
        start.record()
        g.replay()
        stop.record()
        static_out.cpu()
        return start.elapsed_time(stop)

    rows.append(("graph",) + time_mode(graph, seconds))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH (or PATH: named by its folder)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model, batch and mode")
    ap.add_argument("--tolerance", type=float, default=5e-3, help="max |diff| / max |logit| against wae-edge")
    ap.add_argument("--check-only", action="store_true", help="logits check, no timing")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("needs PyTorch: pip install torch")

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    rows, failed = [], False
    for spec in a.model:
        name, _, path = spec.rpartition("=")
        name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
        config, tensors = read_model(path)
        net = build(config, tensors)
        i = config["input"]
        chw = (i["channels"], i["height"], i["width"])

        x = torch.randn((8,) + chw, generator=torch.Generator().manual_seed(0))
        ours = reference_logits(path, x)
        with torch.inference_mode():
            if device == "cuda":
                run = net.to("cuda", torch.float16).to(memory_format=torch.channels_last)
                theirs = run(x.to("cuda", torch.float16).to(memory_format=torch.channels_last)).float().cpu()
            else:
                run = net
                theirs = run(x)
        rel = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-12))
        same_top1 = int((ours.argmax(1) == theirs.argmax(1)).sum())
        ok = rel <= a.tolerance
        failed |= not ok
        print(f"{name}: torch {device} vs wae-edge CPU: max rel diff {rel:.2e}, top-1 agree {same_top1}/8"
              f"{'' if ok else f'  FAIL (> {a.tolerance:g})'}", flush=True)
        if a.check_only:
            continue
        for b in a.batch:
            for mode, p50, gpu in bench(run, (b,) + chw, device, a.seconds):
                print(f"{name}: batch {b} {mode}: p50 {p50:.3f} ms" + (f", gpu {gpu:.3f} ms" if gpu is not None else ""),
                      flush=True)
                rows.append({"model": name, "batch": b, "engine": "torch", "mode": mode, "p50_ms": round(p50, 4),
                             "gpu_ms": None if gpu is None else round(gpu, 4), "max_rel_diff": rel})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""A short demo of the fused layer: train a ReinLayer on a toy objective, eager vs fused.

    python -m rein.demo [--steps 12] [--device cpu|cuda]

Both runs start from the same weights and see the same batches; the demo prints how
far apart their outputs, losses and final weights are, and the step time of each.
On a CPU the fused kernels run through Triton's interpreter, which is slow: CPU
timings say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import copy
import os
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--embed-dims", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # The kernels can only run on a CPU through the interpreter, set before triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import rein

    torch.manual_seed(args.seed)
    C, L, m = args.embed_dims, 4, 20
    base = rein.LoRAReins(lora_dim=8, num_layers=L, embed_dims=C, patch_size=16,
                          token_length=m, scale_init=0.1).to(device)
    # a frozen random "backbone": one linear map + GELU per block
    blocks = [torch.nn.Sequential(torch.nn.Linear(C, C), torch.nn.GELU()).to(device).requires_grad_(False)
              for _ in range(L)]
    head = torch.nn.Linear(C, 3).to(device).requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    batches = [(torch.randn(2, 65, C, generator=gen).to(device),
                torch.randint(0, 3, (2, 64), generator=gen).to(device)) for _ in range(4)]

    def train(fused: bool):
        layer = copy.deepcopy(base)
        layer.fused = fused
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        losses, t0 = [], time.perf_counter()
        for step in range(args.steps):
            x, y = batches[step % len(batches)]
            for i, blk in enumerate(blocks):
                x = layer(blk(x), i, batch_first=True, has_cls_token=True)
            logits = head(x[:, 1:])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if device == "cuda":
            torch.cuda.synchronize()
        return layer, losses, (time.perf_counter() - t0) / args.steps

    print(f"rein demo on {device}: LoRA Rein, L={L}, C={C}, m={m}, {args.steps} AdamW steps, toy objective")
    ref_layer, ref_losses, ref_t = train(fused=False)
    fused_layer, fused_losses, fused_t = train(fused=True)
    x = batches[0][0]
    with torch.no_grad():
        d_out = (fused_layer(x, 0, batch_first=True) - ref_layer(x, 0, batch_first=True)).abs().max().item()
    d_w = max((a - b).abs().max().item() for a, b in zip(fused_layer.parameters(), ref_layer.parameters()))
    d_loss = max(abs(a - b) for a, b in zip(fused_losses, ref_losses))
    print(f"loss: first {ref_losses[0]:.4f} -> last {ref_losses[-1]:.4f} (eager) / {fused_losses[-1]:.4f} (fused)")
    print(f"eager vs fused after training: max |loss diff| {d_loss:.2e}, max |weight diff| {d_w:.2e}, "
          f"max |output diff| {d_out:.2e}")
    print(f"step time: eager {ref_t * 1e3:.1f} ms, fused {fused_t * 1e3:.1f} ms"
          + ("  (CPU: fused runs in Triton's interpreter; not a speed measurement)" if device == "cpu" else ""))


if __name__ == "__main__":
    main()

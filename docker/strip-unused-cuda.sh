#!/bin/sh
# CPU image only: delete the CUDA libraries of the nvidia-* wheels that nothing loads at import.
#
# The pinned torch wheel is the CUDA build (the CPU wheels pair with no torchvision of the lock), so
# the nvidia-* wheels come along: about 3 GB. torch, torchvision and triton link about 1.9 GB of
# them; the rest (cuDNN's engine libraries, cusolverMg, the profiler's nvperf, ...) is dlopen'ed by
# CUDA code paths only, which a CPU image never takes (CUDA_VISIBLE_DEVICES=""). Kept: every library
# in the link closure of torch's, torchvision's and triton's shared objects (ldd), so `import torch`
# still resolves; then a forward/backward pass and torchvision's nms check that torch still runs.
# Run in the same layer as the install, or the deleted files still count in the image.
set -eu
site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
needed="$(mktemp)"
for object in "$site"/torch/lib/*.so* "$site"/torchvision/*.so "$site"/triton/_C/*.so; do
  ldd "$object"
done | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | xargs realpath | sort -u >"$needed"
before="$(du -sm "$site/nvidia" | cut -f1)"
find "$site/nvidia" -type f -name '*.so*' | while read -r library; do
  grep -qxF "$library" "$needed" || rm -f "$library"
done
find "$site/nvidia" -xtype l -delete
rm -f "$needed"
echo "nvidia libraries: ${before} MB -> $(du -sm "$site/nvidia" | cut -f1) MB (kept: what torch, torchvision and triton link)"
python - <<'PY'
import torch
import torchvision

x = torch.randn(2, 3, 32, 32, requires_grad=True)
conv = torch.nn.Conv2d(3, 4, 3)
conv(x).square().mean().backward()
boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
assert x.grad is not None and keep.tolist() == [0], keep
print(f"torch {torch.__version__} runs on CPU after the strip (cuda available: {torch.cuda.is_available()})")
PY

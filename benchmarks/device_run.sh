#!/usr/bin/env bash
# The GPU checks and benchmarks, in one call on a lent GPU machine (its own python3 with torch; no network):
# the packages otclip needs beyond that machine's image travel as wheels in .whl/ (see the README's
# "Benchmarks" section). Usage: bash benchmarks/device_run.sh [tests] [encode] [ot]   (default: all three)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
steps=${*:-tests probe encode ot}
for step in $steps; do
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_gpu.py tests/engine/test_encoding.py \
             -k "not test_cuda_encoding_matches_cpu" 2>&1 | tail -25 ;;  # effnet-minilm's weights: too big to carry
    encode) python3 benchmarks/encode_throughput.py --model ViT-B-32 --images 16384 --batch-size 256 --texts 8192 \
              --scale 1 4 2>&1 | grep -v -i warn | tail -15
            cp benchmarks/results/encode_throughput-cuda-ViT-B-32.json "$OUT"/ ;;
    probe) python3 - <<'PY'  # the device decoder's ceiling: batched nvJPEG alone, then decode + crop (+ thumbnails)
import sys, time, warnings, torch
sys.path.insert(0, "benchmarks")
warnings.simplefilter("ignore")
from torchvision.io import decode_jpeg, ImageReadMode
from encode_throughput import photo_files
from otclip.engine import load_model
from otclip.engine.device_decoding import DeviceJpegDecoder, device_preprocess_steps, read_for_device
loaded = load_model("ViT-B-32")
steps = device_preprocess_steps(loaded.preprocess)
dec = DeviceJpegDecoder(steps, torch.device("cuda"), None, 224)
for scale in (1, 4):
    files = [photo_files(scale)[i % 20] for i in range(256)]
    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    samples = [(i, read_for_device(f, None, 224, False)) for i, f in enumerate(files)]
    for name, fn in [("nvjpeg", lambda: decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")),
                     ("resolve", lambda: dec.resolve(samples, files, False)),
                     ("resolve+thumbs", lambda: dec.resolve(samples, files, True))]:
        fn(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(5): fn()
        torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 5
        print(f"scale {scale} {name:>15}: {256 / dt:8.0f} img/s")
PY
        ;;
    encode-large) python3 benchmarks/encode_throughput.py --model ViT-B-32 --images 8192 --batch-size 256 --texts 256 \
              --scale 4 8 --decode cpu device-all --thumbnails 0 2>&1 | grep -v -i warn | tail -8 ;;
    loop-probe) python3 - <<'PY'  # ot-loop at batch 1024: its implicit backward by CG or by the dense solve
import sys, time, statistics, torch
sys.path.insert(0, "benchmarks")
from ot_cost import clustered
from otclip.training import sinkhorn
from otclip.training.losses import build_regularizer, StepEmbeddings
x0, y0 = clustered(1024, 384, "cuda", 0), clustered(1024, 384, "cuda", 1)
cg = sinkhorn._conjugate_gradients
for label, solver, backward in [("forward only", cg, False), ("cg", cg, True), ("dense", lambda *a, **k: None, True)]:
    sinkhorn._conjugate_gradients = solver
    reg = build_regularizer("ot-loop")
    times = []
    for _ in range(25):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        torch.cuda.synchronize(); t = time.perf_counter()
        loss = sum(reg(StepEmbeddings(x[:256], y[:256], x, y, torch.tensor(2.0, device="cuda"))).values())
        if backward: loss.backward()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    print(f"{label:>13}: median {statistics.median(times[5:]) * 1000:.1f} ms, min {min(times[5:]) * 1000:.1f}")
PY
        ;;
    bary-probe) python3 - <<'PY'  # ot-barycenter at batch 1024: its five problems as one batch or one by one
import sys, time, statistics, functools, torch
sys.path.insert(0, "benchmarks")
from ot_cost import clustered
from otclip.training import losses
x0, y0 = clustered(1024, 384, "cuda", 0), clustered(1024, 384, "cuda", 1)
solve = losses.step_ot_values
for batched in (True, False):
    losses.step_ot_values = functools.partial(solve, batched=batched)
    reg, times = losses.build_regularizer("ot-barycenter"), []
    for _ in range(25):
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        torch.cuda.synchronize(); t = time.perf_counter()
        sum(reg(losses.StepEmbeddings(x[:256], y[:256], x, y, torch.tensor(2.0, device="cuda"))).values()).backward()
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    print(f"batched={batched}: median {statistics.median(times[5:]) * 1000:.1f} ms, min {min(times[5:]) * 1000:.1f}")
PY
        ;;
    pipeline-probe) python3 - <<'PY'  # where the GPU-decoding pipeline's time goes (web-size photos)
import sys, time, functools, torch
sys.path.insert(0, "benchmarks")
from encode_throughput import photo_files
from otclip.engine import Encoder, load_model
from otclip.engine import device_decoding
loaded = load_model("ViT-B-32")
enc = Encoder(loaded, batch_size=256, device_decoding=True)
photos = photo_files(1)
import os
files = [photos[i % len(photos)] for i in range(int(os.environ.get("PROBE_IMAGES", 16384)))]
def timed(label, fn):
    torch.cuda.synchronize(); t = time.perf_counter(); out = fn(); torch.cuda.synchronize()
    print(f"{label:>40}: {len(files) / (time.perf_counter() - t):8.0f} img/s", flush=True); return out
from torch.utils.data import DataLoader
from otclip.engine.encoding import _DecodeDataset
from otclip.engine.device_decoding import pack_jpegs
def loader():
    return DataLoader(_DecodeDataset(files, enc._preprocess.cpu, 224, False, device_decoding.read_for_device),
                      batch_size=256, num_workers=enc.num_workers, collate_fn=pack_jpegs, pin_memory=True,
                      prefetch_factor=4)
list(enc.iter_image_batches(files[:1024]))  # warm-up
parts = timed("workers read only", lambda: list(loader()))
if os.environ.get("PROBE_SHORT"):
    timed("pipeline (decoded_ahead)", lambda: [None for _ in enc.iter_image_batches(files, progress=False)])
    sys.exit(0)
decoded = timed("decode+crop alone (one thread)", lambda: [enc._decoded_on_device(p, files, False) for p in parts])
@torch.no_grad()
def forward():
    for t, b in decoded:
        enc._embed(loaded.model.encode_image, t, prepare=enc._preprocess.on_device)
timed("forward from decoded (with .cpu())", forward)
def sequential():
    for p in loader():
        t, b = enc._decoded_on_device(p, files, False)
        enc._embed(loaded.model.encode_image, t, prepare=enc._preprocess.on_device)
timed("pipeline, decode not ahead", sequential)
timed("pipeline (decoded_ahead)", lambda: [None for _ in enc.iter_image_batches(files, progress=False)])
for depth in (1, 4):
    orig = device_decoding.decoded_ahead
    import otclip.engine.encoding as E
    E.decoded_ahead = functools.partial(orig, depth=depth)
    timed(f"pipeline, depth {depth}", lambda: [None for _ in enc.iter_image_batches(files, progress=False)])
    E.decoded_ahead = orig
PY
        ;;
    ot) python3 benchmarks/ot_cost.py --batches 256 1024 4096 --no-train-steps 2>&1 | tail -12
        cp benchmarks/results/ot_cost-cuda.json "$OUT"/ ;;
  esac
done

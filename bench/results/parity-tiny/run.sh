set -e
python3 - <<'PY'
from pathlib import Path
from PIL import Image
from skimage import data
for folder, names in (("calib", ("astronaut", "coffee", "chelsea")), ("held_out", ("rocket", "immunohistochemistry", "hubble_deep_field"))):
    Path(folder).mkdir(exist_ok=True)
    for n in names:
        Image.fromarray(getattr(data, n)()).reduce(4).save(f"{folder}/{n}.png")
from dfosd.core.bases import load_base
from dfosd.core.checkpoint import write_random_checkpoint
write_random_checkpoint("lora.safetensors", load_base("synthetic:tiny"), rank=16, alpha=16)
PY
common="--ckpt lora.safetensors --base synthetic:tiny --tile 32 --backend onnxruntime"
dfosd-export $common --precision fp32 --out fp32 >/dev/null
for q in unet vae-enc vae-dec unet,vae-enc,vae-dec; do
  dfosd-export $common --precision int8 --float-precision fp32 --calib-data calib --calib-count 32 --quantize $q --out "int8-${q//,/+}" >/dev/null 2>&1
done
dfosd-export $common --precision fp8 --float-precision fp32 --calib-data calib --calib-count 32 --out fp8-all >/dev/null 2>&1
dfosd parity fp32 int8-unet int8-vae-enc int8-vae-dec int8-unet+vae-enc+vae-dec fp8-all --photos held_out --max-tiles 64 --json parity.json

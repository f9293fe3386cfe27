// dfosd-serve's page: pick an image, upscale it through the server's KServe v2 inference endpoint
// (binary tensor data, the form tritonclient uses), show it beside the input. No libraries, no build.
"use strict";
const MODEL = "dfosd";
const $ = (id) => document.getElementById(id);
let info = { tile: 0, overlap: 0, scale: 4, max_pixels: 0, color_fix: "none" };

async function readModel() {
  try {
    const r = await fetch(`/v2/models/${MODEL}/config`);
    const cfg = await r.json();
    if (!r.ok) throw new Error(cfg.error || r.statusText);
    const p = Object.fromEntries(Object.entries(cfg.parameters || {}).map(([k, v]) => [k, v.string_value]));
    info = { tile: +p.tile, overlap: +p.overlap, scale: +p.scale || 4, max_pixels: +p.max_pixels,
             color_fix: p.color_fix || "none" };
    $("scale").textContent = info.scale;
    $("model").textContent = `${p.precision || ""} engines, ${p.backend} backend, tile ${info.tile}; images up to ` +
      `${info.max_pixels.toLocaleString()} pixels; default colour fix: ${info.color_fix}`;
    $("colorfix").options[0].textContent = `the model's default (${info.color_fix})`;
  } catch (e) {
    $("model").textContent = `the model is not ready (${e.message}); reload the page in a moment`;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
  $("progress").hidden = true;
  $("status").textContent = "";
}

function tilesFor(w, h) {
  const t = info.tile, step = info.tile - info.overlap;
  if (!t || step <= 0) return 0;
  const n = (s) => (s <= t ? 1 : Math.ceil((s - t) / step) + 1);
  return n(w) * n(h);
}

async function decode(file) {
  let bitmap;
  try {
    // Raw pixels: no colour-space conversion, so the server sees the file's own values.
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (e) {
    throw new Error(`${file.name} could not be read as an image (${e.message || "unsupported or damaged file"}).`);
  }
  const c = document.createElement("canvas");
  c.width = bitmap.width; c.height = bitmap.height;
  const g = c.getContext("2d");
  g.drawImage(bitmap, 0, 0);
  const rgba = g.getImageData(0, 0, c.width, c.height).data;
  const rgb = new Uint8Array(c.width * c.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  return { bitmap, rgb, width: c.width, height: c.height };
}

function newId() {  // the request's KServe id: the server reports its tiles under it (GET /progress/ID)
  return "page-" + Array.from({ length: 4 }, () => Math.floor(Math.random() * 2 ** 32).toString(16)).join("");
}

function infer(img, colorFix, id, onProgress) {
  const params = { layout: "HWC" };
  if (colorFix) params.color_fix = colorFix;
  const header = new TextEncoder().encode(JSON.stringify({ id,
    inputs: [{ name: "lr_image", shape: [1, img.height, img.width, 3], datatype: "UINT8",
               parameters: { binary_data_size: img.rgb.length } }],
    outputs: [{ name: "sr_image", parameters: { binary_data: true } }], parameters: params }));
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open("POST", `/v2/models/${MODEL}/infer`);
    x.responseType = "arraybuffer";
    x.setRequestHeader("Content-Type", "application/octet-stream");
    x.setRequestHeader("Inference-Header-Content-Length", String(header.length));
    x.upload.onprogress = (e) => onProgress("upload", e.loaded / (e.total || 1));
    x.onprogress = (e) => onProgress("download", e.loaded / (e.total || 1));
    x.onerror = () => reject(new Error("the server could not be reached (is dfosd-serve still running?)"));
    x.onload = () => {
      const body = new Uint8Array(x.response || new ArrayBuffer(0));
      const hlen = +(x.getResponseHeader("Inference-Header-Content-Length") || body.length);
      let head = {};
      try { head = JSON.parse(new TextDecoder().decode(body.subarray(0, hlen))); } catch (e) { /* below */ }
      if (x.status !== 200) {
        reject(new Error(`the server refused this image: ${head.error || x.statusText || x.status}`));
        return;
      }
      const out = head.outputs && head.outputs[0];
      if (!out) { reject(new Error("the server's answer has no image")); return; }
      resolve({ rgb: body.subarray(hlen), height: out.shape[1], width: out.shape[2] });
    };
    const body = new Uint8Array(header.length + img.rgb.length);
    body.set(header, 0); body.set(img.rgb, header.length);
    x.send(body);
  });
}

function show(img, out) {
  const before = $("before"), after = $("after");
  before.width = after.width = out.width;
  before.height = after.height = out.height;
  const gb = before.getContext("2d");
  gb.imageSmoothingQuality = "high";
  gb.drawImage(img.bitmap, 0, 0, out.width, out.height);
  const data = new ImageData(out.width, out.height);
  for (let i = 0, j = 0; j < out.rgb.length; i += 4, j += 3) {
    data.data[i] = out.rgb[j]; data.data[i + 1] = out.rgb[j + 1]; data.data[i + 2] = out.rgb[j + 2];
    data.data[i + 3] = 255;
  }
  after.getContext("2d").putImageData(data, 0, 0);
  $("result").hidden = false;
  $("result").dataset.width = out.width;
  $("result").dataset.height = out.height;
  applyZoom(); applySlider();
  after.toBlob((blob) => {
    const a = $("download");
    if (a.href) URL.revokeObjectURL(a.href);
    a.href = URL.createObjectURL(blob);
    a.hidden = false;
  }, "image/png");
}

function applyZoom() {
  const z = $("zoom").value, w = +$("after").width;
  const css = z === "fit" ? `${Math.min(w, $("viewport").clientWidth || w)}px` : `${w * +z / devicePixelRatio}px`;
  for (const c of [$("before"), $("after")]) { c.style.width = css; c.style.imageRendering = z === "fit" ? "auto" : "pixelated"; }
  applySlider();
}

function applySlider() {
  const v = +$("slider").value;
  $("after").style.clipPath = `inset(0 0 0 ${v}%)`;
  $("divider").style.left = `calc(${v}% - 1px)`;
}

async function run(file) {
  $("error").hidden = true;
  $("result").dataset.state = "running";
  const p = $("progress");
  p.hidden = false; p.removeAttribute("value");
  $("status").textContent = `reading ${file.name}…`;
  let timer = null;
  try {
    const img = await decode(file);
    const tiles = tilesFor(img.width, img.height);
    const t0 = performance.now();
    const id = newId();
    let sentAt = null, polling = false;
    timer = setInterval(async () => {  // the server's own count of the image's tiles
      if (sentAt === null || polling) return;
      polling = true;
      try {
        const r = await fetch(`/progress/${id}`, { cache: "no-store" });
        const s = ((performance.now() - sentAt) / 1000).toFixed(0);
        if (r.ok) {
          const { done, total } = await r.json();
          p.value = done / Math.max(total, 1); p.max = 1;
          $("status").textContent = `upscaling ${img.width}×${img.height}: ${done} of ${total} tiles, ${s} s`;
        } else if (!$("status").textContent.includes("tiles,")) {
          $("status").textContent = `upscaling ${img.width}×${img.height} (${tiles} tiles): ${s} s…`;
        }
      } catch (e) { /* the answer itself says what went wrong */ } finally { polling = false; }
    }, 300);
    const out = await infer(img, $("colorfix").value, id, (phase, f) => {
      if (phase === "upload") {
        p.value = f; p.max = 1;
        $("status").textContent = `sending ${img.width}×${img.height}: ${(100 * f).toFixed(0)} %`;
        if (f >= 1 && sentAt === null) sentAt = performance.now();
      } else {
        $("status").textContent = `receiving the result: ${(100 * f).toFixed(0)} %`;
      }
    });
    const seconds = (performance.now() - t0) / 1000;
    show(img, out);
    p.hidden = true;
    $("status").textContent = `${img.width}×${img.height} → ${out.width}×${out.height} in ${seconds.toFixed(1)} s` +
      ` (colour fix: ${$("colorfix").value || info.color_fix}). Drag the slider to compare; zoom to inspect.`;
    $("result").dataset.state = "done";
  } catch (e) {
    showError(e.message);
    $("result").dataset.state = "failed";
  } finally {
    clearInterval(timer);
  }
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) run(e.target.files[0]); });
$("slider").addEventListener("input", applySlider);
$("zoom").addEventListener("change", applyZoom);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) run(e.dataTransfer.files[0]);
});
readModel();

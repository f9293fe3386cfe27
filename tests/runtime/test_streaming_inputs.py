"""The pieces of --ray that need no cluster: the streamed listing (same images and output names as
the local listing), list files, the per-output resume records and the spooled report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dfosd.core.errors import DfosdError
from dfosd.runtime.inputs import collect_inputs
from dfosd.runtime.listing import check_folders_apart, iter_inputs


def _tree(root: Path) -> Path:
    for rel in ("a.png", "b.JPG", "x.jpg", "x.png", "sub/c.webp", "sub/deep/d.tif", "notes.txt", ".hidden.png",
                ".cache/e.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"stand-in")
    return root


def _split(items):
    images = {(i.src, i.rel) for i in items if i.kind == "image"}
    return images, [i for i in items if i.kind == "problem"], [i for i in items if i.kind == "skipped"]


def test_a_streamed_folder_gives_the_local_listing(tmp_path):
    root = _tree(tmp_path / "in")
    images, problems, skipped = _split(list(iter_inputs([str(root)], tmp_path / "out")))
    local = collect_inputs([str(root)], out_dir=tmp_path / "out")
    assert images == {(str(s), str(r)) for s, r in local.pairs}
    assert len(images) == 5  # x.png loses to x.jpg (both would write x.png), as locally
    assert [p.message for p in problems] == [m.replace(str(root) + "/x.png", str(root / "x.png")) for m in local.problems]
    assert {i.src for i in skipped} == {str(p) for p, _ in local.skipped}


def test_list_files_stream_with_their_mistakes_named(tmp_path):
    root = _tree(tmp_path / "in")
    listing = tmp_path / "in" / "list.txt"
    listing.write_text(f"# frames\na.png\n\nsub/c.webp\n{root / 'sub/deep/d.tif'}\nmissing.png\na.png\n"
                       f"{tmp_path / 'elsewhere' / 'a.png'}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.png").write_bytes(b"stand-in")
    items = list(iter_inputs([str(listing)], tmp_path / "out"))
    images, problems, skipped = _split(items)
    assert {rel for _, rel in images} == {"a.png", "sub/c.webp", "d.tif"}  # relative paths keep sub-folders
    assert [p.message for p in problems][0].endswith("line 6: no such file: missing.png")
    assert "would overwrite that of" in problems[1].message and "elsewhere" in problems[1].message
    assert [s.message for s in skipped] == [f"listed twice (first as {root / 'a.png'})"]


def test_nested_input_folders_are_refused(tmp_path):
    root = _tree(tmp_path / "in")
    with pytest.raises(DfosdError, match="upscaled twice"):
        check_folders_apart([str(root), str(root / "sub")])
    check_folders_apart([str(root / "sub"), str(root / "a.png")])  # a file beside is fine


def test_resume_records_hold_only_while_everything_is_unchanged(tmp_path):
    from dfosd.runtime.resume import done_record_path, is_done, write_done

    out = tmp_path / "out"
    src, dst = tmp_path / "in.png", out / "sub" / "in.png"
    src.write_bytes(b"input")
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"output")
    ident = {"export": "k1", "backend": "onnxruntime", "color_fix": "none", "format": "png"}
    assert not is_done(out, src, dst, ident)
    write_done(out, src, dst, ident)
    assert done_record_path(out, dst).parent.name == "sub" and is_done(out, src, dst, ident)
    assert not is_done(out, src, dst, {**ident, "export": "k2"})
    assert not is_done(out, src, dst, {**ident, "color_fix": "adain"})
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # the input was replaced
    assert not is_done(out, src, dst, ident)
    write_done(out, src, dst, ident)
    dst.write_bytes(b"edited!")  # the output was changed since
    assert not is_done(out, src, dst, ident)
    dst.unlink()
    assert not is_done(out, src, dst, ident)


def test_the_spooled_report_is_the_local_reports_shape(tmp_path):
    from dfosd.runtime.stream_report import StreamingReport

    rep = StreamingReport(tmp_path / "r.json", {"engines": "e", "color_fix": "none"})
    rep.write("running")
    assert json.loads((tmp_path / "r.json").read_text())["images"] == []
    for i in range(3):
        rep.add({"input": f"{i}.png", "status": "ok" if i else "failed"})
    rep.write("complete", images_per_second=1.5)
    rep.close()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["state"] == "complete" and data["summary"] == {"ok": 2, "failed": 1, "skipped": 0, "interrupted": 0}
    assert [r["input"] for r in data["images"]] == ["0.png", "1.png", "2.png"] and data["images_per_second"] == 1.5
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no spool, no temporary file left

"""Model + preprocessing benchmark: images/s and latency per engine, ratio to the best engine and to the
FLOP floor (model FLOPs / measured peak matmul FLOP/s), and decode+window time per transfer syntax with
imagecodecs (ours) vs pydicom's default pixel handlers.

    python benchmarks/bench_models.py [--models-dir DIR] [--threads 2] [--quick] [--only preprocess|models]

Uses the deterministic demo models (built/cached in --models-dir) and the real files in ../shared/data. The
lossless transfer syntaxes (JPEG lossless SV1, JPEG-LS, RLE, JPEG 2000 lossless) are made here from the 15-bit
WG04 CR (1955 x 1841) by re-encoding its pixels, as the tests do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"


def _time(fn, repeat: int, warmup: int = 1) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_flops(threads: int) -> dict[str, float]:
    """FP32 GEMM FLOP/s of every BLAS here, best-of: torch's MKL takes its AVX2 path on AMD CPUs, while ONNX
    Runtime's MLAS and OpenBLAS use AVX-512, so one library alone can understate the machine by 2x."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    n = 2048
    flop = 2 * n**3
    out: dict[str, float] = {}
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["torch"] = flop / _time(lambda: a @ b, 5)
    an, bn = a.numpy(), b.numpy()
    out["numpy"] = flop / _time(lambda: an @ bn, 5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    feeds = {"A": an, "B": bn}
    out["onnxruntime"] = flop / _time(lambda: sess.run(None, feeds), 5)
    return out


def model_flops(module, shape) -> float:  # type: ignore[no-untyped-def]
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(torch.zeros(shape))
    return float(fc.get_total_flops())


def bench_models(models_dir: Path, threads: int, quick: bool) -> None:
    import torch

    from cxr_triage.models.demo import ensure_demo_models
    from cxr_triage.models.engines import OrtEngine, TorchEngine, available_engines
    from cxr_triage.models.export import load_card_module, output_names_for

    torch.set_num_threads(threads)
    cards = ensure_demo_models(models_dir)
    peaks = peak_flops(threads)
    peak = max(peaks.values())
    each = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    print(f"\npeak FP32 GEMM: {peak / 1e9:.1f} GFLOP/s on {threads} threads (best of: {each});"
          f" engines here: {available_engines()}")
    print(f"{'model':10s} {'engine':12s} {'batch':>5s} {'latency ms':>11s} {'img/s':>8s} {'vs best':>8s} {'vs FLOP floor':>14s}")
    for card in cards:
        module = load_card_module(card)
        spec = card.input
        flops = model_flops(module, (1, spec.channels, spec.size, spec.size))
        rows = []
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, spec.channels, spec.size, spec.size)).astype(np.float32)
            engines = [OrtEngine(card.onnx_path, intra_op_threads=threads),
                       TorchEngine(module, output_names=output_names_for(card), intra_op_threads=threads)]
            if torch.cuda.is_available():
                engines.append(TorchEngine(load_card_module(card), output_names=output_names_for(card), device="cuda"))
            for e in engines:
                rep = 2 if (quick or card.task == "detection" or batch == 8) else 5
                t = _time(lambda: e.run(x), rep)
                rows.append((card.task[:10], f"{e.name}:{e.providers[0][:4]}", batch, t))
        for task, name, batch, t in rows:
            best = min(r[3] / r[2] for r in rows if r[2] == batch)
            floor = flops * batch / peak
            print(f"{task:10s} {name:12s} {batch:5d} {t * 1e3:11.1f} {batch / t:8.2f} {t / batch / best:8.2f}x "
                  f"{t / floor:13.1f}x")
        print(f"  ({card.name}: {flops / 1e9:.2f} GFLOP per image; FLOP floor {flops / peak * 1e3:.1f} ms/img)")


def _lossless_files(out_dir: Path) -> dict[str, Path]:
    """The 15-bit CR re-encoded losslessly in each transfer syntax the shared data lacks."""
    import copy

    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from cxr_triage.models.preprocess import decode_dicom_pixels

    src = pydicom.dcmread(DATA / "dicom" / "wg04-cr-chest-pa-j2k-monochrome1.dcm")
    pixels = np.ascontiguousarray(decode_dicom_pixels(src))
    bits = int(src.BitsStored)
    native = copy.deepcopy(src)
    native.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    native.PixelData = pixels.tobytes()
    native["PixelData"].VR = "OW"
    files = {}
    path = out_dir / "native16.dcm"
    native.save_as(path, enforce_file_format=True)
    files["uncompressed 15-bit"] = path
    encoders = {
        "JPEG lossless SV1": ("1.2.840.10008.1.2.4.70",
                              lambda: imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits)),
        "JPEG-LS lossless": ("1.2.840.10008.1.2.4.80", lambda: imagecodecs.jpegls_encode(pixels)),
        "J2K lossless": ("1.2.840.10008.1.2.4.90",
                         lambda: imagecodecs.jpeg2k_encode(pixels, codecformat="J2K", reversible=True,
                                                           bitspersample=bits)),
    }
    for name, (ts, encode) in encoders.items():
        ds = copy.deepcopy(native)
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([bytes(encode())])
        ds["PixelData"].VR = "OB"
        path = out_dir / f"{ts}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[name] = path
    ds = copy.deepcopy(native)
    ds.compress(RLELossless)
    path = out_dir / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    files["RLE lossless"] = path
    return files


def bench_preprocess() -> None:
    import tempfile

    import pydicom

    from cxr_triage.models.preprocess import InputSpec, decode_dicom_pixels_and_codec, load_image, prepare

    files = {
        "JPEG baseline": DATA / "dicom" / "siim-cr-pa-jpeg-baseline.dcm",
        "JPEG 2000 (15-bit)": DATA / "dicom" / "wg04-cr-chest-pa-j2k-monochrome1.dcm",
        "uncompressed": DATA / "dicom" / "nih-dx-secondary-capture.dcm",
        "PNG (8-bit)": sorted((DATA / "nih-cxr14" / "images").glob("*.png"))[0],
    }
    tmp = tempfile.TemporaryDirectory(prefix="bench-preprocess-")
    files.update(_lossless_files(Path(tmp.name)))
    spec = InputSpec(224, 1, "xrv")
    print(f"\n{'preprocess':20s} {'size':>11s} {'ours decode ms':>15s} {'ours +LUT ms':>13s} {'+resize ms':>11s} "
          f"{'pydicom pixel_array ms':>23s} {'+apply_voi_lut ms':>18s} {'pydicom/ours':>13s}  our codec")
    for name, path in files.items():
        ours = _time(lambda: load_image(path), 5)
        img = load_image(path)
        rs = _time(lambda: prepare(img, spec), 5)
        size = f"{img.shape[1]}x{img.shape[0]}"
        if path.suffix == ".dcm":
            codec = decode_dicom_pixels_and_codec(pydicom.dcmread(path))[1]
            dec = _time(lambda: decode_dicom_pixels_and_codec(pydicom.dcmread(path)), 5)

            def ref() -> None:
                ds = pydicom.dcmread(path)
                arr = ds.pixel_array
                from pydicom.pixels import apply_voi_lut, apply_modality_lut

                apply_voi_lut(apply_modality_lut(arr, ds), ds)

            def ref_decode() -> None:
                pydicom.dcmread(path).pixel_array  # noqa: B018

            t_ref = _time(ref_decode, 3)
            r1 = f"{t_ref * 1e3:23.1f}"
            r2 = f"{_time(ref, 3) * 1e3:18.1f}"
            ratio = f"{t_ref / dec:12.1f}x"
            d = f"{dec * 1e3:15.1f}"
        else:
            codec, d, r1, r2, ratio = "PIL", f"{'-':>15s}", f"{'-':>23s}", f"{'-':>18s}", f"{'-':>13s}"
        print(f"{name:20s} {size:>11s} {d} {ours * 1e3:13.1f} {rs * 1e3:11.1f} {r1} {r2} {ratio}  {codec}")
    tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/cxr-triage-bench-models"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-models", action="store_true", help="same as --only preprocess")
    ap.add_argument("--only", choices=("preprocess", "models"), default=None,
                    help="run one table: preprocessing per transfer syntax (seconds) or the engines (minutes)")
    args = ap.parse_args()
    if args.only in (None, "preprocess"):
        bench_preprocess()
    if args.only in (None, "models") and not args.skip_models:
        bench_models(args.models_dir, args.threads, args.quick)


if __name__ == "__main__":
    main()

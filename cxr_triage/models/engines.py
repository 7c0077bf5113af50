"""Inference engines behind one small interface.

Every engine has ``name`` (str), ``providers`` (tuple of str: what actually executes), ``output_names`` and
``run(batch: np.ndarray[N, C, H, W] float32) -> dict[str, np.ndarray]`` (host float32 arrays). Engines are
created once per process and are safe to call from one thread at a time (the worker's batching loop);
ONNX Runtime sessions are additionally thread-safe.

* :class:`OrtEngine` -- ONNX Runtime; CPU by default, CUDA / TensorRT execution providers when present and
  asked for (:func:`ort_providers` orders them: TensorRT, CUDA, CPU); ``intra_op_threads`` configurable; graph
  optimisation level ALL.
* :class:`TorchEngine` -- eager torch reference (optional ``torch.compile``; CUDA graphs via
  ``mode="reduce-overhead"`` on GPU).
* :class:`TensorRTEngine` -- TensorRT 10.x plan: deserialise, set the input shape per batch, bind torch CUDA
  tensors' addresses with ``set_tensor_address`` and ``execute_async_v3`` on a torch CUDA stream.
"""

from __future__ import annotations

import threading
from pathlib import Path
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Engine", "OrtEngine", "TorchEngine", "TensorRTEngine", "select_engine", "available_engines",
           "EngineUnavailable", "ort_providers", "ort_provider_entries"]

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


class EngineUnavailable(RuntimeError):
    """The requested engine kind cannot run here (library or device missing)."""


@runtime_checkable
class Engine(Protocol):
    name: str
    providers: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def _check_batch(batch: np.ndarray) -> np.ndarray:
    if batch.ndim != 4:
        raise ValueError(f"batch must be N x C x H x W, got shape {batch.shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def ort_providers(available: Collection[str], *, device: str | None = None) -> list[str]:
    """ONNX Runtime execution providers to ask for, best first: TensorRT, then CUDA, then CPU. CPU is always
    last because ONNX Runtime places a node no earlier provider can run on the next one in the list (TensorRT EP
    hands unsupported subgraphs to CUDA). ``device="cpu"`` asks for CPU alone."""
    if device == "cpu":
        return [CPU_EP]
    return [p for p in (TRT_EP, CUDA_EP) if p in available] + [CPU_EP]


def ort_provider_entries(
    providers: Sequence[str],
    available: Collection[str],
    *,
    device_id: int = 0,
    trt_cache_dir: str | Path | None = None,
    trt_fp16: bool = True,
    input_name: str = "input",
    input_shape: tuple[int, int, int] | None = None,
    max_batch: int = 8,
) -> list[str | tuple[str, dict[str, Any]]]:
    """``InferenceSession(providers=...)`` entries for the wanted providers that exist here, with options.

    TensorRT EP: engine cache under ``trt_cache_dir`` (its engines take minutes to build; without a cache every
    worker start rebuilds them) plus its timing cache, FP16 per ``trt_fp16``, and -- when the input shape is
    known -- one optimisation profile for batch 1..``max_batch``, so a new batch size does not trigger a rebuild
    in the middle of serving. CPU is appended when missing (the fallback for nodes the others cannot run)."""
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for p in providers:
        if p not in available:
            continue
        if p == TRT_EP:
            o: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": bool(trt_fp16)}
            if trt_cache_dir:
                o.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(trt_cache_dir),
                         trt_timing_cache_enable=True, trt_timing_cache_path=str(trt_cache_dir))
            if input_shape is not None:
                dims = "x".join(str(int(d)) for d in input_shape)
                o.update(trt_profile_min_shapes=f"{input_name}:1x{dims}",
                         trt_profile_opt_shapes=f"{input_name}:{int(max_batch)}x{dims}",
                         trt_profile_max_shapes=f"{input_name}:{int(max_batch)}x{dims}")
            chosen.append((p, o))
        elif p == CUDA_EP:
            chosen.append((p, {"device_id": device_id}))
        else:
            chosen.append(p)
    if all((c if isinstance(c, str) else c[0]) != CPU_EP for c in chosen):
        chosen.append(CPU_EP)
    return chosen


class OrtEngine:
    """ONNX Runtime session over an ONNX file."""

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        device_id: int = 0,
        trt_cache_dir: str | Path | None = None,
        trt_fp16: bool = True,
        input_shape: tuple[int, int, int] | None = None,
        max_batch: int = 8,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = int(inter_op_threads)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        available = set(ort.get_available_providers())
        wanted = list(providers) if providers else [CPU_EP]
        if trt_cache_dir and TRT_EP in wanted and TRT_EP in available:
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
        chosen = ort_provider_entries(wanted, available, device_id=device_id, trt_cache_dir=trt_cache_dir,
                                      trt_fp16=trt_fp16, input_shape=input_shape, max_batch=max_batch)
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=chosen)
        self.providers = tuple(self.session.get_providers())
        self.name = "onnxruntime"
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(list(self.output_names), {self.input_name: _check_batch(batch)})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs)}


class TorchEngine:
    """Eager torch reference engine around an ``nn.Module`` returning a tuple of tensors."""

    def __init__(
        self,
        module: "torch.nn.Module",
        *,
        output_names: Sequence[str],
        device: str = "cpu",
        compile: bool = False,  # noqa: A002
        cuda_graphs: bool = False,
        half: bool = False,
        intra_op_threads: int | None = None,
    ) -> None:
        import torch

        if intra_op_threads:
            torch.set_num_threads(int(intra_op_threads))
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable("torch CUDA device requested but CUDA is not available")
        self.device = torch.device(device)
        self.half = bool(half and self.device.type == "cuda")
        module = module.eval().to(self.device)
        if self.half:
            module = module.half()
        self.module = module
        self._fn = module
        if compile or cuda_graphs:
            mode = "reduce-overhead" if (cuda_graphs and self.device.type == "cuda") else "default"
            self._fn = torch.compile(module, mode=mode, dynamic=False)
        self.output_names = tuple(output_names)
        self.name = "torch" + ("-compiled" if self._fn is not module else "")
        self.providers = (f"torch:{self.device.type}",)
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(_check_batch(batch)).to(self.device, non_blocking=True)
        if self.half:
            x = x.half()
        with self._lock, torch.inference_mode():
            outs = self._fn(x)
            if isinstance(outs, torch.Tensor):
                outs = (outs,)
            result = {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}
        return result


class TensorRTEngine:
    """TensorRT 10.x engine from a serialized plan (dynamic batch within the plan's optimisation profile)."""

    def __init__(self, plan_path: str | Path, *, device_id: int = 0) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineUnavailable("TensorRT is not installed") from exc
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailable("TensorRT needs a CUDA GPU")
        self._trt = trt
        self._torch = torch
        self.device = torch.device("cuda", device_id)
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.plan_path = Path(plan_path)  # which cached plan serves (the worker's choice is checkable)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineUnavailable(
                f"TensorRT could not deserialize {Path(plan_path).name} (built for another TensorRT/GPU?)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if len(self.input_names) != 1:
            raise EngineUnavailable("expected exactly one input tensor in the TensorRT engine")
        self.input_name = self.input_names[0]
        # the batch range of profile 0
        _min, _opt, _max = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = int(_max[0])
        self.name = "tensorrt"
        self.providers = (f"tensorrt-{trt.__version__}", torch.cuda.get_device_name(self.device))
        self._lock = threading.Lock()

    def _torch_dtype(self, name: str) -> Any:
        trt, torch = self._trt, self._torch
        dt = self.engine.get_tensor_dtype(name)
        return {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT8: torch.int8,
            trt.DataType.BOOL: torch.bool,
        }[dt]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        batch = _check_batch(batch)
        if batch.shape[0] > self.max_batch:  # split: the plan's profile caps the batch
            parts = [self.run(batch[i : i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        with self._lock, torch.cuda.stream(self.stream):
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.to(self._torch_dtype(self.input_name)).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            self.context.set_tensor_address(self.input_name, int(x.data_ptr()))
            outs: dict[str, Any] = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                t = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                self.context.set_tensor_address(name, int(t.data_ptr()))
                outs[name] = t
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self.stream.synchronize()
            return {n: t.float().cpu().numpy() for n, t in outs.items()}


def available_engines() -> list[str]:
    kinds = ["onnxruntime", "torch"]
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            kinds.insert(0, "tensorrt")
    except ImportError:
        pass
    return kinds


def select_engine(
    kind: str = "auto",
    *,
    onnx_path: str | Path | None = None,
    plan_path: str | Path | None = None,
    module: "torch.nn.Module | None" = None,
    output_names: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    device: str | None = None,
    trt_cache_dir: str | Path | None = None,
    trt_fp16: bool = True,
    input_shape: tuple[int, int, int] | None = None,
    max_batch: int = 8,
) -> Engine:
    """Create an engine. ``auto``: TensorRT plan if given and TensorRT+CUDA are present, else ONNX Runtime
    (with its TensorRT and CUDA providers when available, :func:`ort_providers`), else torch.

    ``trt_cache_dir`` / ``trt_fp16`` / ``input_shape`` / ``max_batch`` configure ONNX Runtime's TensorRT
    provider (see :func:`ort_provider_entries`); they change nothing on a CPU-only machine."""
    if kind not in ("auto", "onnxruntime", "tensorrt", "torch"):
        raise ValueError("engine kind must be auto, onnxruntime, tensorrt or torch")
    if kind == "tensorrt" or (kind == "auto" and plan_path is not None and "tensorrt" in available_engines()):
        if plan_path is None:
            raise EngineUnavailable("tensorrt engine requested but no plan was built (cxr-triage models build)")
        return TensorRTEngine(plan_path)
    if kind in ("auto", "onnxruntime") and onnx_path is not None:
        import onnxruntime as ort

        providers = ort_providers(ort.get_available_providers(), device=device)
        return OrtEngine(onnx_path, providers=providers, intra_op_threads=intra_op_threads,
                         trt_cache_dir=trt_cache_dir, trt_fp16=trt_fp16, input_shape=input_shape,
                         max_batch=max_batch)
    if kind == "onnxruntime":
        raise EngineUnavailable("onnxruntime engine requested but no ONNX file was given")
    if module is None or output_names is None:
        raise EngineUnavailable("torch engine requested but no module was given")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchEngine(module, output_names=output_names, device=device, intra_op_threads=intra_op_threads)

"""`ts.torch_handler.base_handler.BaseHandler`: TorchServe 0.12's base class for handlers.

`initialize(context)` loads the archive's model the way TorchServe does: an eager model when
the manifest names a `modelFile` (its one class, with the state_dict of `serializedFile`), a
TorchScript `.pt`, an ONNX `.onnx` (with onnxruntime), or an AOT-compiled `.so` / `.pt2`
(with `pt2: {export: {aot_compile: true}}` in model-config.yaml). The model goes to
`cuda:<gpu_id>` when the worker has a GPU id and CUDA is available, else to the CPU, and is
wrapped in `torch.compile` when model-config.yaml's `pt2` section asks for it. `handle` runs
`preprocess` → `inference` → `postprocess` (or `explain_handle` for a request sent to
`/explanations/...`, marked by the `explain: True` header) and records `HandlerTime`.

Subclasses rely on the attribute names (`model`, `mapping`, `device`, `map_location`,
`manifest`, `context`, `model_pt_path`, `initialized`, `model_yaml_config`, ...): they are
TorchServe's. Nothing happens at import beyond defining the class.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import sys
import time
from typing import Any

import torch

from ts.handler_utils.timer import timed
from ts.utils.util import check_valid_pt2_backend, list_classes_from_module, load_label_mapping

logger = logging.getLogger(__name__)

#: where profiled batches write their traces (one folder per model), as in TorchServe
_TRACE_ROOT = "/tmp/pytorch_profiler"


def _optional(name: str, purpose: str) -> Any:
    """Import an optional package, or fail saying which package the model needs and why."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(
            f"{purpose} needs the Python package {name!r}, which is not installed in the "
            f"worker's environment ({exc})"
        ) from None


def setup_ort_session(model_pt_path: str, map_location: str | None) -> Any:
    """An onnxruntime `InferenceSession` for `model_pt_path` (CUDA first when on a GPU)."""
    ort = _optional("onnxruntime", f"the ONNX model {os.path.basename(model_pt_path)!r}")
    providers = ["CPUExecutionProvider"]
    if map_location == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model_pt_path, providers=providers, sess_options=options)


def _compile_options(pt2: Any) -> dict[str, Any] | None:
    """The `torch.compile` keyword arguments model-config.yaml's `pt2` value asks for, if any.

    Accepted like TorchServe: `{compile: {enable: true, backend: ..., ...}}`, or the older
    forms `pt2: inductor` / `pt2: {backend: inductor, mode: ...}`; `{export: ...}` means no
    compilation (the model was exported ahead of time).
    """
    if isinstance(pt2, dict) and "compile" in pt2:
        options = dict(pt2["compile"] or {})
        if not options.pop("enable", False):
            return None
    elif isinstance(pt2, dict) and "export" in pt2:
        return None
    elif isinstance(pt2, str):
        options = {"backend": pt2}
    elif isinstance(pt2, dict):
        options = dict(pt2)
        logger.warning(
            "pt2 options directly under `pt2` are deprecated: use `pt2: {compile: {enable: true,"
            " ...}}` in model-config.yaml"
        )
    else:
        raise ValueError(f"pt2 in model-config.yaml must be a str or a mapping, not {pt2!r}")
    if "backend" in options and not check_valid_pt2_backend(options["backend"]):
        return None
    return options


def _explained_request(raw_data: list[Any]) -> tuple[Any, Any]:
    """What `get_insights` is given besides the preprocessed batch: the first request's main
    input and its `target` (0 when it has none, or a falsy one); (None, 0) when the first row
    is not a dict of inputs."""
    first = raw_data[0] if raw_data else None
    if not isinstance(first, dict):
        return None, 0
    return first.get("data") or first.get("body"), first.get("target") or 0


class BaseHandler(abc.ABC):  # noqa: B024 (abstract in name only, as TorchServe's)
    """Loads the archive's model and serves batches: tensor in, `tolist()` out."""

    def __init__(self) -> None:
        self.model: Any = None
        self.mapping: dict[str, str] | None = None
        self.device: Any = None
        self.initialized = False
        self.context: Any = None
        self.model_pt_path: str | None = None
        self.manifest: Any = None
        self.map_location: str | None = None
        self.explain = False
        self.target = 0
        self.profiler_args: dict[str, Any] = {}
        self.model_yaml_config: dict[str, Any] = {}

    # -- loading ---------------------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Load the model of the archive described by `context` and the label mapping."""
        self.context = context
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        properties = context.system_properties
        self._choose_device(properties.get("gpu_id"))
        self.manifest = context.manifest
        model_dir = properties.get("model_dir") or ""
        model = (self.manifest or {}).get("model", {})
        serialized = model.get("serializedFile")
        self.model_pt_path = os.path.join(model_dir, serialized) if serialized else None
        self.model = self._load_model(model_dir, model.get("modelFile", ""))
        self._maybe_compile()
        logger.debug("Model file %s loaded successfully", self.model_pt_path)
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def _choose_device(self, gpu_id: Any) -> None:
        if gpu_id is not None and torch.cuda.is_available():
            self.map_location = "cuda"
            self.device = torch.device(f"cuda:{gpu_id}")
            if torch.cuda.get_device_capability(self.device) >= (8, 0):
                torch.set_float32_matmul_precision("high")  # tensor cores, as TorchServe does
        else:
            self.map_location = "cpu"
            self.device = torch.device("cpu")

    def _load_model(self, model_dir: str, model_file: str) -> Any:
        path = self.model_pt_path
        if model_file:
            logger.debug("Loading eager model")
            model = self._load_pickled_model(model_dir, model_file, path)
            model.to(self.device)
            model.eval()
            return model
        if path is None:
            raise RuntimeError(
                "No model weights could be loaded: the archive has neither a serialized file "
                "nor a model file"
            )
        if path.endswith(".pt"):
            model = self._load_torchscript_model(path)
            model.eval()
            return model
        if path.endswith(".onnx"):
            session = setup_ort_session(path, self.map_location)
            logger.info("Successfully set up the onnxruntime session")
            return session
        if path.endswith((".so", ".pt2")) and self._use_torch_export_aot_compile():
            if self.map_location == "cuda":
                torch.cuda.set_device(self.device)
            return self._load_torch_export_aot_compile(path)
        if path.endswith((".so", ".pt2")):
            raise RuntimeError(
                f"No model weights could be loaded: {os.path.basename(path)!r} is an AOT-compiled "
                "model, which needs `pt2: {export: {aot_compile: true}}` in model-config.yaml"
            )
        raise RuntimeError(
            f"No model weights could be loaded: {os.path.basename(path)!r} is not a TorchScript "
            "(.pt), ONNX (.onnx) or AOT-compiled (.so, .pt2) file, and the archive has no "
            "model file (--model-file) for an eager model"
        )

    def _maybe_compile(self) -> None:
        if "pt2" not in getattr(self, "model_yaml_config", {}):
            return
        options = _compile_options(self.model_yaml_config["pt2"])
        if options is None:
            return
        described = ", ".join(f"{k} {v}" for k, v in options.items())
        try:
            self.model = torch.compile(self.model, **options)
            logger.info("Compiled model with %s", described)
        except Exception as exc:  # TorchServe serves the model uncompiled, and so do we
            logger.warning("Compiling the model with %s failed, serving it uncompiled: %s",
                           described, exc)  # fmt: skip

    def _load_torch_export_aot_compile(self, model_so_path: str) -> Any:
        """Load an AOT-compiled model (`torch._export.aot_compile` `.so`, or a `.pt2` package)."""
        package = model_so_path.endswith(".pt2")
        module, name = (
            ("torch._inductor", "aoti_load_package") if package else ("torch._export", "aot_load")
        )
        loader = getattr(importlib.import_module(module), name, None)
        if loader is None:
            raise RuntimeError(
                f"torch {torch.__version__} cannot load the AOT-compiled "
                f"{'package' if package else 'model'} {os.path.basename(model_so_path)!r} "
                f"(it has no {module}.{name})"
            )
        return loader(model_so_path) if package else loader(model_so_path, self.map_location)

    def _load_torchscript_model(self, model_pt_path: str) -> Any:
        return torch.jit.load(model_pt_path, map_location=self.device)  # type: ignore[no-untyped-call]

    def _load_pickled_model(
        self, model_dir: str, model_file: str, model_pt_path: str | None
    ) -> Any:
        """The one class of `model_file` (a module in `model_dir`), with the state_dict of
        `model_pt_path` loaded into it when there is one."""
        if not os.path.isfile(os.path.join(model_dir, model_file)):
            raise RuntimeError(f"Missing the model file {model_file!r} in {model_dir}")
        if model_dir and model_dir not in sys.path:
            sys.path.insert(0, model_dir)
        module = importlib.import_module(model_file.split(".")[0])
        classes = list_classes_from_module(module)
        if len(classes) != 1:
            names = [c.__name__ for c in classes]
            raise ValueError(
                f"Expected only one class as model definition in {model_file}, found {names}"
            )
        model = classes[0]()
        if model_pt_path:
            state_dict = torch.load(model_pt_path, map_location=self.device, weights_only=True)
            model.load_state_dict(state_dict)
        return model

    def _use_torch_export_aot_compile(self) -> bool:
        pt2 = getattr(self, "model_yaml_config", {}).get("pt2")
        export = pt2.get("export") if isinstance(pt2, dict) else None
        return isinstance(export, dict) and export.get("aot_compile") is True

    # -- serving ---------------------------------------------------------------------------

    @timed
    def preprocess(self, data: Any) -> Any:
        """The batch as one tensor on the model's device; override for real inputs."""
        return torch.as_tensor(data, device=self.device)

    @timed
    def inference(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the model on `data` (moved to the model's device) without autograd."""
        with torch.inference_mode():
            return self.model(data.to(self.device), *args, **kwargs)

    @timed
    def postprocess(self, data: Any) -> Any:
        """One answer per row of the model's output."""
        return data.tolist()

    def handle(self, data: list[Any], context: Any) -> Any:
        """Answer one batch: `describe_handle` for a describe request, `explain_handle` for an
        explanation request, else preprocess → inference → postprocess; records HandlerTime."""
        started = time.time()
        self.context = context
        metrics = context.metrics
        if self._profiler_enabled():
            if self.manifest is None:
                self.manifest = context.manifest
            output, _ = self._infer_with_profiler(data=data)
        elif self._is_describe():
            output = [self.describe_handle()]
        else:
            data_preprocess = self.preprocess(data)
            if self._is_explain():
                output = self.explain_handle(data_preprocess, data)
            else:
                output = self.postprocess(self.inference(data_preprocess))
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.time() - started) * 1000, 2), None, "ms")
        return output

    def _profiler_enabled(self) -> bool:
        """TorchServe's switch: the worker's environment has `ENABLE_TORCH_PROFILER` set."""
        return bool(os.environ.get("ENABLE_TORCH_PROFILER"))

    def _infer_with_profiler(self, data: list[Any]) -> tuple[Any, Any]:
        """Answer the batch as `handle` would, under `torch.profiler`; returns the answers
        and the profiler. Each step is a labelled region of the trace, and a summary of the
        costliest operators goes to the log. `profiler_args` are the profiler's arguments;
        what it leaves out gets TorchServe's defaults (`_profiler_arguments`)."""
        from torch import profiler

        explaining = self._is_explain()
        with profiler.profile(**self._profiler_arguments()) as recorded:
            with profiler.record_function("preprocess"):
                value: Any = self.preprocess(data)
            steps: list[tuple[str, Any]] = (
                [("explain", lambda batch: self.explain_handle(batch, data))]
                if explaining
                else [("inference", self.inference), ("postprocess", self.postprocess)]
            )
            for label, step in steps:
                with profiler.record_function(label):
                    value = step(value)
        summary = recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        logger.info("profile of one batch, costliest operators first:\n%s", summary)
        return value, recorded

    def _profiler_arguments(self) -> dict[str, Any]:
        """`profiler_args`, completed in place: with none set, CPU and CUDA activity and
        tensor shapes are recorded; without `on_trace_ready`, TensorBoard traces are written
        under /tmp/pytorch_profiler/<model name>."""
        from torch import profiler

        arguments = self.profiler_args
        if not arguments:
            arguments["activities"] = [
                profiler.ProfilerActivity.CPU,
                profiler.ProfilerActivity.CUDA,
            ]
            arguments["record_shapes"] = True
        if "on_trace_ready" not in arguments:
            model_name = ((self.manifest or {}).get("model") or {}).get("modelName") or ""
            folder = os.path.join(_TRACE_ROOT, model_name)
            arguments["on_trace_ready"] = profiler.tensorboard_trace_handler(folder)
            logger.info("profiler traces for this model are written under %s", folder)
        return arguments

    def explain_handle(self, data_preprocess: Any, raw_data: list[Any]) -> Any:
        """The batch's explanations (e.g. Captum attributions): the subclass's
        `get_insights(preprocessed batch, input, target)`, where input and target come from
        the batch's first request (its `data`, else `body`; its `target`, else 0)."""
        get_insights = getattr(self, "get_insights", None)
        if get_insights is None:
            raise NotImplementedError(
                f"{type(self).__name__} cannot explain: it does not implement get_insights()"
            )
        inputs, target = _explained_request(raw_data)
        logger.debug("explaining a batch of %d for target %r", len(raw_data), target)
        return get_insights(data_preprocess, inputs, target)

    def _is_explain(self) -> bool:
        if self.context is not None and self.context.get_request_header(0, "explain") == "True":
            self.explain = True
            return True
        return False

    def _is_describe(self) -> bool:
        return self.context is not None and self.context.get_request_header(0, "describe") == "True"

    def describe_handle(self) -> Any:
        """The model's description for `GET /models/{name}?customized=true`; None by default."""
        return None

    def get_device(self) -> Any:
        return self.device

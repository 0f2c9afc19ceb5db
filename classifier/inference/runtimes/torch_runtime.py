"""The torch runtime (the default): torchvision's ResNet18 and weights, its preprocessing, and the forward
pass in torch, in ONNX Runtime (BACKEND=onnxruntime) or in int8 (PRECISION=int8). load(settings) builds it
(model.load calls it); numpy arrays in and out, like every runtime (model.Runtime says what they provide).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.fx.experimental.optimization import fuse
from torchvision.models import ResNet18_Weights, resnet18

from classifier.errors import ModelLoadError
from classifier.inference.preprocessing import Preprocessing
from classifier.inference.runtime import Runtime, default_batch_size
from classifier.inference.runtimes import fastest, onnx_runtime
from classifier.inference.runtimes.fastest import best_time
from classifier.settings import Settings

log = logging.getLogger(__name__)

WEIGHTS = ResNet18_Weights.DEFAULT
NUM_CLASSES = len(WEIGHTS.meta["categories"])  # the outputs: runtime.NUM_CLASSES

# What the weights were trained with: shorter side to 256 (bilinear, antialiased), centre crop 224,
# ImageNet mean and std. Using torchvision's own object keeps us bit-identical to its reference.
transforms = WEIGHTS.transforms()
preprocessing = Preprocessing(resize=transforms.resize_size[0], crop=transforms.crop_size[0], mean=tuple(transforms.mean),
                              std=tuple(transforms.std), interpolation=transforms.interpolation.value)
CROP_SIZE = preprocessing.crop


def preprocess(image: Image.Image) -> np.ndarray:
    """An RGB picture -> the model's input [3, 224, 224], by torchvision's own transforms.

    Their forward, not the module's call: exporting a model (BACKEND=auto, while SIGHUP reloads) traces it with
    torch.fx, which replaces nn.Module.__call__ for the whole process meanwhile, and a decode thread calling the
    transforms then failed ("module is not installed as a submodule": a 500 for a job image)."""
    return transforms.forward(image).numpy()


DEMO_WEIGHTS = "demo: seeded stand-in weights, not trained (DEMO=true): the answers mean nothing"


def load_model(weights_path: Path | None, demo: bool = False) -> tuple[torch.nn.Module, str]:
    """The ResNet18 in eval mode, and a description of where its weights came from."""
    if demo:
        log.warning("DEMO=true: serving seeded stand-in weights, not trained; every answer is meaningless")
        torch.manual_seed(0)  # always the same stand-in weights
        return resnet18(num_classes=NUM_CLASSES).eval(), DEMO_WEIGHTS
    if weights_path is not None:
        # Clients see the file's name only (GET /model); the full path goes to the log.
        log.info("loading weights from %s", weights_path)
        return _load_file(weights_path), f"file:{weights_path.name}"
    try:
        model = resnet18(weights=WEIGHTS, progress=False)
    except Exception as error:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ModelLoadError(
            f"MODEL_WEIGHTS is not set and torchvision could not load {WEIGHTS} "
            f"from its cache {cache} or download it from {WEIGHTS.url} ({error}).\n"
            "Fix one of: set MODEL_WEIGHTS=/path/to/resnet18_state_dict.pth; "
            f"put {WEIGHTS.url.rsplit('/', 1)[-1]} into {cache} (TORCH_HOME moves it); "
            "or start once on a machine with internet access to fill the cache."
        ) from None
    return model.eval(), f"torchvision:{WEIGHTS}"


def _load_file(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"MODEL_WEIGHTS={path} does not exist or is not a file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(f"MODEL_WEIGHTS={path} is not a PyTorch state_dict file ({error})") from None
    with torch.device("meta"):  # no random initial values: the file's replace them all (a reload's CPU spared)
        model = resnet18(num_classes=NUM_CLASSES)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0]
        raise ModelLoadError(f"MODEL_WEIGHTS={path} does not hold ResNet18 weights: {reason}") from None
    return model.eval()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(setting: str) -> torch.device:
    """DEVICE=auto: CUDA when torch sees a GPU, else the CPU."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("DEVICE=cuda, but torch sees no CUDA device (no GPU, no driver, or a CPU-only torch)")
    return torch.device("cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu")


def native_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX512_BF16 or AMX); without them bf16 is emulated."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_problem(device: str, precision: str, has_native_bf16: bool, force: bool) -> str | None:
    """Why this precision should not run on this device, or None."""
    if precision == "fp16" and device == "cpu":
        return "PRECISION=fp16 is for GPUs; on a CPU use bf16 (where the CPU has native bfloat16) or fp32"
    if precision == "bf16" and device == "cpu" and not has_native_bf16 and not force:
        return ("PRECISION=bf16, but this CPU has no native bfloat16 instructions (AVX512_BF16 or AMX): "
                "emulated, it would be slower than fp32, not faster. Use fp32, or FORCE_PRECISION=true to run it anyway")
    return None


def torch_forward(network: torch.nn.Module, device: torch.device, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Eager torch, tuned for inference, fp32 logits out (check_parity measures the difference at start-up).

    Each BatchNorm is folded into the convolution before it (a copy; the loaded model is untouched), and
    tensors use the channels_last layout that oneDNN's and cuDNN's convolutions prefer: about 1.5x together
    on a CPU. bf16/fp16 run the whole network in that type; the logits come back as fp32, so softmax is fp32.
    On a GPU the batch is copied from pinned memory without blocking; decoding stays on CPU threads.
    """
    dtype = DTYPES[precision]
    network = fuse(network).to(device=device, dtype=dtype, memory_format=torch.channels_last)

    if device.type == "cuda":
        def forward(images: torch.Tensor) -> torch.Tensor:
            on_gpu = images.pin_memory().to(device, non_blocking=True)
            return network(on_gpu.to(dtype).contiguous(memory_format=torch.channels_last)).float().cpu()
    else:
        def forward(images: torch.Tensor) -> torch.Tensor:
            return network(images.to(dtype).contiguous(memory_format=torch.channels_last)).float()

    return forward


def export_onnx(network: torch.nn.Module) -> bytes:
    """The network as an ONNX graph: images [N, 3, 224, 224] -> logits [N, 1000]."""
    exported = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        torch.onnx.export(network, (torch.zeros(1, 3, CROP_SIZE, CROP_SIZE),), exported, dynamo=False,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return exported.getvalue()


def session_forward(session) -> Callable[[torch.Tensor], torch.Tensor]:  # noqa: ANN001
    run = onnx_runtime.session_forward(session)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run(images.numpy()))

    return forward


def onnx_forward(network: torch.nn.Module, threads: int, graph: Callable[[], bytes] | None = None
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same network exported to ONNX (by default in memory; graph: where the export comes from), run by
    ONNX Runtime: images -> logits."""
    try:
        return session_forward(onnx_runtime.session((graph or (lambda: export_onnx(network)))(), threads))
    except Exception as error:
        raise ModelLoadError(f"could not export the model to ONNX Runtime ({type(error).__name__}: {error})") from None


def fastest_exact(network: torch.nn.Module, weights_hash: str, settings: Settings
                  ) -> tuple[fastest.Choice, Callable[[torch.Tensor], torch.Tensor]]:
    """BACKEND=auto on a CPU in fp32: torch and ONNX Runtime (its export kept in RUNTIME_CACHE_DIR, by the
    weights' hash), each checked against fp32 torch, the faster chosen (fastest.py) and its forward pass."""
    cache = settings.runtime_cache_dir
    export = cache / f"{weights_hash}.onnx"
    batch_size = settings.max_batch_size or default_batch_size("cpu")
    record = cache / f"{weights_hash}-{fastest.machine(settings.threads, batch_size)}.json"

    def onnx() -> Callable[[torch.Tensor], torch.Tensor]:
        return onnx_forward(network, settings.threads, lambda: fastest.kept(export, lambda: export_onnx(network)))

    # An earlier start chose on this machine: only that runtime is built (load checks it, as every backend).
    choice = fastest.remembered(record)
    if choice is not None and choice.backend in ("torch", "onnxruntime"):
        try:
            forward = torch_forward(network, torch.device("cpu"), "fp32") if choice.backend == "torch" else onnx()
            return said(choice), forward
        except ModelLoadError as error:
            log.warning("BACKEND=auto: the runtime an earlier start chose cannot be built (%s): measuring again", error)
    candidates = {"torch": torch_forward(network, torch.device("cpu"), "fp32")}
    try:
        candidates["onnxruntime"] = onnx()
        check_parity(candidates["onnxruntime"], network, "the onnxruntime backend on cpu in fp32")
    except ModelLoadError as error:  # torch still serves; the log says why ONNX Runtime does not
        log.warning("BACKEND=auto: ONNX Runtime is not a candidate: %s", error)
        candidates.pop("onnxruntime", None)
        export.unlink(missing_ok=True)  # a damaged export is made again by the next start
    choice = fastest.choose(candidates, record, batch_size)
    return said(choice), candidates[choice.backend]


def said(choice: fastest.Choice) -> fastest.Choice:
    log.info("BACKEND=auto: %s serves, %s (ms by batch size: %s; BACKEND=torch or onnxruntime pins one)",
             choice.backend, "remembered from an earlier start" if choice.remembered else "measured now",
             "; ".join(f"{name} {timings}" for name, timings in choice.timings_ms.items()))
    return choice


def int8_forward(path: Path, threads: int, weights: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    """PRECISION=int8: the model `python -m quantize` built (INT8_MODEL), run by ONNX Runtime, and what it
    records of its making. Refused when it was quantized from other weights than those loaded."""
    if not path.is_file():
        raise ModelLoadError(f"INT8_MODEL={path} does not exist or is not a file: build it with "
                             "python -m quantize --calibration DIR --out FILE")
    try:
        session = onnx_runtime.session(str(path), threads)
    except Exception as error:
        raise ModelLoadError(f"INT8_MODEL={path} is not an ONNX model ({type(error).__name__}); "
                             "rebuild it with python -m quantize") from None
    made = onnx_runtime.recorded(session)
    if made.get("weights") != weights:
        raise ModelLoadError(f"INT8_MODEL={path} was quantized from other weights "
                             f"({made.get('weights', 'unknown')}) than those loaded ({weights}): "
                             "rebuild it with python -m quantize from these weights")
    made["model_hash"] = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()  # in the model version
    return session_forward(session), made


def int8_problem(int8_s: float, fp32_s: float, force: bool) -> str | None:
    """Why int8 should not run here, or None: slower than fp32 on this CPU (measured at start-up)."""
    if int8_s >= fp32_s and not force:
        return (f"PRECISION=int8 is not faster than fp32 on this CPU ({int8_s * 1000:.0f} vs {fp32_s * 1000:.0f} ms "
                "for a batch of 8, measured at start-up): use fp32, or FORCE_PRECISION=true to run it anyway")
    return None


def check_parity(forward: Callable[[torch.Tensor], torch.Tensor], network: torch.nn.Module, what: str,
                 tolerance: float | None = 1e-4) -> float:
    """Largest difference of softmax scores between forward and the plain fp32 torch model on the CPU,
    network (as loaded, fp32 on the CPU) on a probe batch; what: the backend, device and precision, for errors.

    Start-up refuses an fp32 backend or device that does not match (tolerance): speed never buys a different
    answer. Reduced precision (bf16, fp16, int8; tolerance None) is an opt-in difference, measured and shown:
    how far rounding moves a confident model's scores depends on the weights and the photos, not on a probe of
    noise, so bench/accuracy.py judges it on real photos. Start-up refuses it only when it is broken: scores
    that are not numbers.
    """
    probe = torch.randn(4, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        scores = torch.softmax(forward(probe), 1)
        difference = (scores - torch.softmax(network(probe), 1)).abs().max().item()
    if not torch.isfinite(scores).all():
        raise ModelLoadError(f"{what} gives scores that are not numbers (NaN or infinite): a broken backend")
    if tolerance is not None and difference > tolerance:
        raise ModelLoadError(f"{what} differs from fp32 torch on the CPU by {difference:.2e} > {tolerance:.0e}")
    return difference


def fingerprint(network: torch.nn.Module) -> str:
    """A hash of the weights' values (BLAKE2b over every tensor, in state_dict order): which model answered."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def predictor(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        """Preprocessed images [N, 3, 224, 224] -> softmax probabilities [N, 1000]."""
        return torch.softmax(forward(torch.from_numpy(batch)), dim=1).numpy()

    return predict


def set_threads(threads: int) -> None:
    """The threads of this thread's parallel work (each thread has its own count: the forward thread's is
    THREADS, set as the model loads; each decoder's 1)."""
    torch.set_num_threads(threads)


def load_network(settings: Settings) -> tuple[torch.nn.Module, str, str]:
    """The weights the settings choose (MODEL_WEIGHTS, TORCH_HOME, DEMO) in fp32 on the CPU: the network, where
    its weights came from, and their hash. What python -m export and python -m quantize start from."""
    network, weights_source = load_model(settings.model_weights, settings.demo)
    return network, weights_source, fingerprint(network)


def load(settings: Settings) -> Runtime:
    """The torch runtime the settings choose (BACKEND, DEVICE, PRECISION, INT8_MODEL), checked against fp32 torch
    on the CPU. Raises ModelLoadError."""
    # fp32 on a GPU means fp32: no TensorFloat-32 shortcuts in convolutions or matrix products.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(settings.threads)
    precision = settings.precision
    backend = "onnxruntime" if precision == "int8" else settings.backend  # int8 runs in ONNX Runtime
    device = torch.device("cpu") if backend == "onnxruntime" else pick_device(settings.device)
    if backend == "auto" and (device.type != "cpu" or precision != "fp32"):
        backend = "torch"  # ONNX Runtime runs fp32 on the CPU here: no other candidate
    if problem := precision_problem(device.type, precision, native_bf16(), settings.force_precision):
        raise ModelLoadError(problem)
    network, weights_source, weights_hash = load_network(settings)
    choice = None
    int8_made: dict[str, str] = {}  # what the int8 model records of its calibration, and its measured speed-up
    if precision == "int8":
        assert settings.int8_model is not None  # the settings refuse int8 without it
        forward, int8_made = int8_forward(settings.int8_model, settings.threads, weights_hash)
        probe_batch = torch.rand(8, 3, CROP_SIZE, CROP_SIZE, generator=torch.Generator().manual_seed(1))
        int8_s, fp32_s = best_time(forward, probe_batch), best_time(torch_forward(network, device, "fp32"), probe_batch)
        if problem := int8_problem(int8_s, fp32_s, settings.force_precision):
            raise ModelLoadError(problem)
        int8_made["speedup_vs_fp32"] = f"{fp32_s / int8_s:.2f}"
    elif backend == "auto":
        choice, forward = fastest_exact(network, weights_hash, settings)
        backend = choice.backend
    elif backend == "torch":
        forward = torch_forward(network, device, precision)
    else:
        forward = onnx_forward(network, settings.threads)
    difference = check_parity(forward, network, f"the {backend} backend on {device.type} in {precision}",
                              1e-4 if precision == "fp32" else None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Runtime(tuple(WEIGHTS.meta["categories"]), preprocessing, preprocess, predictor(forward), set_threads,
                   settings.threads, weights_source, weights_hash, backend, device.type, device_name, precision,
                   difference, int8_made, choice=choice)

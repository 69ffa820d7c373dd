"""Where and how a job computes: the device, the numeric precision, the memory format, compilation.

A job resolves one `Runtime` from its `train` settings before anything is built, and every part
that touches tensors (training, teacher training, teacher and test evaluation, `aomd.evaluate`)
receives it instead of resolving the device again.

    train.device         auto | cpu | cuda | cuda:N      (auto: CUDA when available)
    train.precision      auto | fp32 | bf16 | fp16       (auto: bf16 on a CUDA card that supports it, else fp32)
    train.channels_last  null | true | false             (null: true on CUDA without compile, else false)
                                                         (under compile: the batches' layout; parameters stay standard)
    train.compile        false | true                    (torch.compile of student and teacher)
    train.deterministic  true | false                    (deterministic kernels: a run repeats exactly)
    train.cuda_graphs    false | true                    (CUDA, not compiled: the teacher's forward as a CUDA graph)
    train.fused_adapters null | true | false             (null: true on CUDA; AOMD's adapters fused by torch.compile)

With `cuda_graphs` the teacher's forward pass in the training step is captured once as a CUDA graph
and replayed (`InferenceGraph`): one launch instead of a ResNet50's few hundred kernels. That pays
only on hosts whose Python launches kernels more slowly than the card runs them (on an H200 with a
fast host it gained nothing: docs/benchmarks.md), hence off by default.

With `fused_adapters` AOMD computes its loss from the adapters' convolutions with their bias, ReLU,
the student descriptors and the mapping terms compiled into a few kernels
(`aomd.losses.aomd.fused_adapted_aomd`), which cuts the adapters' memory traffic and the mapping
terms' launches; the CPU keeps the eager adapters unless asked, so CPU results do not change.

Mixed precision is autocast over the networks' forward passes; the loss terms compute their
arithmetic in float32 or float64 whatever the precision (see `aomd.losses.objective`), and
retrieval metrics always use float32 embeddings.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from torch import nn

from aomd.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_compiled(model: nn.Module) -> bool:
    """Whether `Runtime.prepare_network` compiled `model`'s forward pass."""
    return hasattr(model.forward_with_stages, "_torchdynamo_orig_callable")


def usable_cpus() -> int:
    """The CPU cores this process may run on: a SLURM job's allocation (its CPU affinity), not
    the node's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes in bfloat16 natively (compute capability 8.0, Ampere, or
    later). `torch.cuda.is_bf16_supported()` also says yes where bf16 is emulated (V100, T4:
    slower than fp32, and inductor refuses to compile for it), and asks the current device, not
    the job's."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def check_settings(precision: Any, num_workers: Any, compile: bool, cuda_graphs: bool) -> None:
    """The rules of the runtime settings that hold on any machine: checked with the config
    (aomd.config), so that a sweep with a bad value stops before it starts, and again here."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if not (num_workers == "auto" or isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0):
        raise ConfigError(f"train.num_workers must be auto or an integer of 0 or more, got {num_workers!r}.")
    if cuda_graphs and compile:
        raise ConfigError("train.cuda_graphs=true and train.compile=true both take over the teacher's forward; "
                          "use one of them.")


@dataclass(frozen=True)
class Runtime:
    """The resolved device, precision, memory format, compilation and loader settings of a job."""

    device: torch.device
    precision: str = "fp32"           # fp32 | bf16 | fp16, never auto
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 0              # DataLoader worker processes
    pin_memory: bool = False
    deterministic: bool = True
    cuda_graphs: bool = False         # the training step's teacher forward replays as a CUDA graph
    fused_adapters: bool = False      # AOMD's adapters, bias to loss, compiled (`prepare_objective`)

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", channels_last: bool | None = None,
                compile: bool = False, num_workers: Any = "auto", pin_memory: bool | None = None,
                deterministic: bool = True, cuda_graphs: bool = False,
                fused_adapters: bool | None = None) -> "Runtime":
        """Resolve the `auto` values for this machine; a setting it cannot honour is a ConfigError."""
        if device == "auto":
            resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            resolved = torch.device(device)
        on_cuda = resolved.type == "cuda"
        if on_cuda and not torch.cuda.is_available():
            raise ConfigError(f"train.device={device} but this machine has no CUDA device PyTorch can use; "
                              f"use train.device=cpu (or auto).")
        if on_cuda and resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={device} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
        if on_cuda and resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        check_settings(precision, num_workers, compile, cuda_graphs)
        if precision == "auto":
            precision = "bf16" if on_cuda and native_bf16(resolved) else "fp32"
        elif precision == "bf16" and on_cuda and not native_bf16(resolved):
            raise ConfigError(f"train.precision=bf16 but {torch.cuda.get_device_name(resolved)} does not support "
                              f"bfloat16; use train.precision=fp16 or fp32.")
        if num_workers == "auto":
            # the CPU trains in the main process (tests and results unchanged); a GPU needs loaders
            num_workers = min(8, max(usable_cpus() - 1, 1)) if on_cuda else 0
        if channels_last is None:
            # compiled networks get their memory layout from inductor, which picks channels_last for
            # convolutions itself (`place` keeps their parameters in the standard layout)
            channels_last = on_cuda and not compile
        if cuda_graphs and not on_cuda:
            raise ConfigError(f"train.cuda_graphs=true needs a CUDA device, but the job runs on {resolved}; "
                              f"use train.cuda_graphs=false.")
        return cls(
            device=resolved,
            precision=precision,
            channels_last=bool(channels_last),
            compile=bool(compile),
            num_workers=num_workers,
            pin_memory=on_cuda if pin_memory is None else bool(pin_memory) and on_cuda,
            deterministic=bool(deterministic),
            cuda_graphs=bool(cuda_graphs),
            fused_adapters=on_cuda if fused_adapters is None else bool(fused_adapters),
        )

    @classmethod
    def from_train(cls, train) -> "Runtime":
        """The runtime of a `train` config section."""
        return cls.resolve(train.device, train.precision, train.channels_last, train.compile,
                           train.num_workers, train.pin_memory, train.deterministic,
                           # configs saved before these keys: no graphs, adapters fused on CUDA
                           getattr(train, "cuda_graphs", False), getattr(train, "fused_adapters", None))

    def seed_everything(self, seed: int) -> None:
        """Seed every generator and choose the kernels, so that a run repeats exactly when
        `deterministic` (on the CPU: bit for bit; on CUDA: the gpu tier checks it).

        Without deterministic kernels, backward through the samplers' indexing (index_put_ with
        accumulation) adds in a thread-dependent order on the CPU, and cuDNN and cuBLAS pick
        algorithms whose sums differ between runs. Kernels with no deterministic version only
        warn (warn_only). Not deterministic lets cuDNN autotune its algorithms: runs that drift
        in the last digits, for steps within a few percent on an H200 (docs/benchmarks.md).
        """
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.deterministic:
            # cuBLAS reads this when its first handle is made (the first matrix product, after this call)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        # deterministic mode also fills every new tensor with NaN, to expose reads of uninitialised
        # memory: a kernel per new tensor (about a third of the kernels of a bf16 AOMD step on an
        # H200, docs/benchmarks.md); no aomd code reads uninitialised memory, and runs repeat without it
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = not self.deterministic

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None in fp32."""
        return _AMP_DTYPES.get(self.precision)

    def autocast(self, cache_enabled: bool = True) -> ContextManager:
        """The precision context of the networks' forward passes (a no-op in fp32). A CUDA graph
        captures with `cache_enabled=False`: its weight casts must be replayed, not cached."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    @property
    def fused_optimizer(self) -> bool:
        """Whether Adam runs fused (one kernel for all parameters; CUDA only). The CPU keeps the
        for-loop implementation, so CPU results do not change."""
        return self.device.type == "cuda"

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (float16 gradients underflow without it); a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of the batches the networks take."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def place(self, module: nn.Module) -> nn.Module:
        """Move `module` (a network or the objective) to the device in the job's memory format;
        compiled, in the standard layout whatever `channels_last` says: channels_last parameters
        fail in inductor's convolution backward (a stride assertion, seen with PyTorch 2.11 on an
        H100), while channels_last batches should give channels_last stage maps (what the adapters
        need; the gpu tier checks it, and it has not yet run on a card)."""
        parameters_format = torch.contiguous_format if self.compile else self.memory_format
        return module.to(self.device, memory_format=parameters_format)

    def prepare_objective(self, objective: nn.Module) -> nn.Module:
        """`place` the objective and switch its fusable terms (those with a `fused` attribute:
        `aomd.losses.aomd.AdaptedAOMD`) to `fused_adapters`."""
        self.place(objective)
        for module in objective.modules():
            if hasattr(module, "fused"):
                module.fused = self.fused_adapters
        return objective

    def prepare_network(self, model: nn.Module) -> nn.Module:
        """`place` a network and, with `compile`, compile its stage-tapping forward pass.

        The compiled function replaces the bound method on this instance only; the module's
        state_dict holds the same values either way (in the layout `place` chose: a run resumed
        with another layout copies them into its own, and its optimiser's moments too,
        `aomd.engine.load_optimizer_state`).
        Shapes are static: each batch shape the network meets (the training batch, the evaluation
        batch, which `Evaluator` pads to one size) compiles once, into kernels specialised for it,
        and no batch size makes every later graph dynamic.
        """
        self.place(model)
        if self.compile and not is_compiled(model):
            model.forward_with_stages = torch.compile(model.forward_with_stages, dynamic=False)
        return model

    def forget_compiled_graphs(self) -> None:
        """With `compile` or `fused_adapters`: drop the graphs compiled earlier in this process,
        so that a training loop compiles its own. Hydra's default launcher runs a sweep's jobs one
        after another in one process, every EmbeddingNet shares one cache of at most 8 graphs
        (dynamo's recompile limit), and with static shapes a sweep over batch or image sizes would
        fill it: later jobs would run uncompiled, with only a warning. The fused adapters' graphs
        of earlier jobs (other precisions, batch or image sizes) go too, so each job's calls find
        its own graph first. Inductor's cache on disk keeps compiling the same graphs again cheap."""
        if self.compile or self.fused_adapters:
            torch.compiler.reset()

    def frozen_copy(self, network: nn.Module) -> nn.Module:
        """The network as the training step runs a frozen teacher. Under autocast: a copy whose
        convolution and linear weights are stored in the autocast dtype, which is what autocast
        casts them to at every call (the same rounding, so the same outputs), without those casts
        each step; batch norm keeps float32. fp32 or compiled: the network itself.
        The copy does not follow later changes to the network's weights."""
        if self.amp_dtype is None or self.compile:
            return network
        frozen = copy.deepcopy(network)
        for module in frozen.modules():
            if type(module) in (nn.Conv2d, nn.Linear):  # not subclasses, whose forward may need float32 weights
                module.to(self.amp_dtype)
        return frozen

    def describe(self) -> dict[str, Any]:
        """What was resolved, for metrics.json, W&B and the console."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "precision": self.precision,
                "channels_last": self.channels_last, "compile": self.compile, "num_workers": self.num_workers,
                "deterministic": self.deterministic, "cuda_graphs": self.cuda_graphs,
                "fused_adapters": self.fused_adapters}


class InferenceGraph:
    """`forward(images)` of a network in inference, captured as one CUDA graph per input shape and
    replayed: a ResNet50 forward is one launch instead of a few hundred (`train.cuda_graphs`).

    The graph replays the kernels the eager forward runs, so the outputs are the eager outputs; each
    capture is checked against an eager forward of another batch before it is used, and a capture
    that does not reproduce it raises. The outputs live in the graph's own memory and the next call
    overwrites them: a caller uses them before it calls again (the training step does). The
    network must not change shape or device afterwards; its weights may change in place.
    """

    def __init__(self, forward: Callable[[torch.Tensor], Any], runtime: "Runtime", warmup: int = 3):
        assert runtime.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.forward, self.runtime, self.warmup = forward, runtime, warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Any:
        key = (tuple(images.shape), images.dtype, images.stride(), images.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(images)
        graph, static_images, static_outputs = self._graphs[key]
        static_images.copy_(images)
        graph.replay()
        return static_outputs

    def _run(self, images: torch.Tensor) -> Any:
        with self.runtime.autocast(cache_enabled=False):
            return self.forward(images)

    def _capture(self, images: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]:
        # on the images' own card: a graph captured while another card is current records nothing
        with torch.cuda.device(images.device):
            static_images = torch.empty_like(images).copy_(images)
            # warm-up and capture on a side stream, as PyTorch's graph recipe asks: cuDNN and cuBLAS
            # set up their handles and workspaces outside the capture
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._run(static_images)
            torch.cuda.current_stream(images.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread-local: the DataLoader's pin-memory thread keeps allocating page-locked memory meanwhile
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                static_outputs = self._run(static_images)
            self._check(graph, static_images, static_outputs, images)
        return graph, static_images, static_outputs

    def _check(self, graph, static_images, static_outputs, images) -> None:
        """Replay on a batch the capture did not see and compare with the eager forward: an empty
        or stale graph would otherwise hand the same teacher outputs to every step, silently."""
        probe = images.flip(0) * 0.5
        static_images.copy_(probe)
        graph.replay()
        expected, replayed = _tensors(self._run(probe)), _tensors(static_outputs)
        assert len(expected) == len(replayed)
        for ours, eager in zip(replayed, expected):
            if not torch.allclose(ours.float(), eager.float(), rtol=1e-2, atol=1e-2):
                raise RuntimeError("The CUDA graph of the teacher's forward does not reproduce its eager forward; "
                                   "run with train.cuda_graphs=false.")


def _tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a forward's outputs (a tensor, or tuples and lists of them), in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [tensor for item in outputs for tensor in _tensors(item)]


def from_host(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`tensors` on `device`; host tensors reach a CUDA device in asynchronous copies from
    page-locked memory, which do not wait for the work queued on the card (a pageable copy would
    wait for the device to finish what it was given before)."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(t.to(device) if t.is_cuda else (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
                 for t in tensors)


def in_feature_precision(layer: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Apply a loss term's own layer (float32 weights: an adapter, a regressor) to feature maps
    in the features' precision, so a bf16/fp16 job runs it at mixed-precision speed while the
    term's arithmetic around it stays in float32."""
    if feats.dtype not in (torch.bfloat16, torch.float16):
        return layer(feats)
    with torch.autocast(feats.device.type, dtype=feats.dtype):
        return layer(feats)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 when it is bf16/fp16; float32 and float64 tensors as they are."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor

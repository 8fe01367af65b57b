"""Block offload for LoRA training: the frozen weights of the denoiser's transformer blocks wait on the CPU and
come to the training device one group of ``offload_blocks`` blocks at a time, as block swapping does in other
trainers.

diffusers' group offloading (``ModelMixin.enable_group_offload``) is built for inference and cannot train a LoRA
inside the blocks: it moves every tensor of a group (``module.to``), the trainable LoRA parameters and their
gradients included, so they are on the CPU when the optimizer (whose state is on the device) steps; with
``use_stream`` it puts back the pinned copy taken when it was enabled, which would undo every update; a group of
several blocks is brought in only when its first block runs, so gradient checkpointing's per-block recomputation
finds the other blocks offloaded; and without checkpointing autograd keeps some saved weights as the parameter
itself (RMSNorm's ``x * weight``), so backward would read them where offloading left them. Here, with plain
PyTorch hooks:

* only parameters that do not require grad move (the base weights and the training adapter); the LoRA, its
  gradients and the optimizer state never leave the device;
* every block brings its own group in (forward pre-hook), which sends back the group that was there: one group
  on the device at a time, in the forward pass and in checkpointing's recomputation alike;
* each weight's CPU copy is made once (pinned on CUDA). Frozen weights never change, so sending a group back just
  drops its device copies; a layerwise-cast (fp8) base keeps its 8-bit storage;
* without checkpointing, saved-tensor hooks record a saved block weight (the parameter or a view of it) by
  reference; backward brings its group back when it needs it, so the graph holds no device copy of a block's
  weights. (The compute-dtype copies that an 8-bit base makes per call are the graph's own tensors: they stay,
  as without offloading; with checkpointing only the running block's exist.)
* the end of every denoiser call and the optimizer's step pre-hook send the last group back, so between steps all
  the blocks' frozen weights are on the CPU;
* ``remove()`` (also after an error) puts every weight back on its device and removes every hook.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from ..manager.errors import InvalidInputError, get_logger
from .adapters import gc_enabled

logger = get_logger(__name__)
GB = 1024**3


def enable(denoiser, per_group: int, device, optimizer) -> list:
    """``[BlockOffload]`` (it has ``remove()``, like the run's other hooks) or ``[]`` when ``per_group`` is 0."""
    return [BlockOffload(denoiser, per_group, device, optimizer)] if per_group else []


def block_groups(denoiser, per_group: int) -> list:
    """The blocks to offload: each ``nn.ModuleList`` child of the denoiser (Z-Image: noise and context refiners,
    main layers) cut into runs of ``per_group``."""
    import torch

    lists = [child for child in denoiser.children() if isinstance(child, torch.nn.ModuleList)]
    groups = [list(blocks[i : i + per_group]) for blocks in lists for i in range(0, len(blocks), per_group)]
    if not groups:
        raise InvalidInputError(
            f"offload_blocks needs a denoiser built of transformer blocks; "
            f"{type(denoiser).__name__} has none (set offload_blocks=0)"
        )
    return groups


def _park(param, host) -> None:
    """Where a frozen weight rests between its group's uses: its CPU copy."""
    param.data = host


class _Saved(NamedTuple):
    """A saved block weight, by reference: its group, the parameter and the view of it that autograd saved."""

    group: int
    param: object
    dtype: object
    size: tuple
    stride: tuple
    offset: int


class BlockOffload:
    """The hooks and CPU copies of one run; see the module docstring."""

    def __init__(self, denoiser, per_group: int, device, optimizer):
        import torch

        self.device = torch.device(device)
        self.host: list = []  # per group: [(param, CPU copy, home device)]
        self.where: dict = {}  # id(param) -> (group, param)
        self.handles: list = []
        self.loaded = None  # the group now on the device
        self._contexts: list = []
        self._pin = self.device.type == "cuda"  # pinned CPU copies: asynchronous transfers
        self.by_reference = not gc_enabled(denoiser)  # checkpointing saves nothing of a block in the forward pass
        if any(hasattr(m, "_hf_hook") for m in denoiser.modules()):
            raise InvalidInputError(
                "offload_blocks cannot be combined with TurboLoader's offload='model' or 'sequential' (accelerate "
                "already moves this denoiser); load the model with offload='none', or set offload_blocks=0"
            )
        try:
            groups = block_groups(denoiser, per_group)
            self._offload(groups)
            self._hook(denoiser, groups, optimizer)
        except BaseException:
            self.remove()
            raise

    def _offload(self, groups) -> None:
        frozen = [{id(p): p for b in blocks for p in b.parameters() if not p.requires_grad} for blocks in groups]
        count = Counter(k for params in frozen for k in params)  # a weight shared by two groups stays put
        for i, params in enumerate(frozen):
            group = []
            self.host.append(group)
            for key, p in params.items():
                if count[key] == 1:
                    group.append((p, self._host_copy(p), p.device))
                    self.where[key] = (i, p)
                    _park(p, group[-1][1])
        moved = sum(p.numel() * p.element_size() for group in self.host for p, _, _ in group)
        logger.info(
            "offload_blocks: %.2f GB of frozen block weights wait on the CPU, %d groups of up to %d blocks",
            moved / GB,
            len(groups),
            max(len(g) for g in groups),
        )

    def _host_copy(self, param):
        host = param.data.to("cpu", copy=True)
        if self._pin:
            try:
                return host.pin_memory()
            except RuntimeError as e:  # e.g. a limit on page-locked memory: slower transfers, same results
                self._pin = False
                logger.warning("offload_blocks: no pinned host memory (%s); using pageable memory", e)
        return host

    def _hook(self, denoiser, groups, optimizer) -> None:
        for i, blocks in enumerate(groups):
            for block in blocks:
                self.handles.append(block.register_forward_pre_hook(lambda module, args, i=i: self._load(i)))
        if self.by_reference:
            self.handles.append(denoiser.register_forward_pre_hook(self._enter))
        self.handles.append(denoiser.register_forward_hook(self._leave, always_call=True))
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        self.handles.append(inner.register_step_pre_hook(lambda *_: self._unload()))

    # -- moving groups --------------------------------------------------------------------

    def _load(self, index: int) -> None:
        """Group ``index`` on the device, the one that was there back on the CPU."""
        if self.loaded == index:
            return
        self._unload()
        self.loaded = index
        for p, host, _ in self.host[index]:
            p.data = host.to(self.device, non_blocking=True, copy=True)

    def _unload(self) -> None:
        index, self.loaded = self.loaded, None
        if index is not None:
            for p, host, _ in self.host[index]:
                _park(p, host)

    # -- the denoiser call and saved tensors ----------------------------------------------

    def _enter(self, module, args) -> None:
        import torch

        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)  # idle where nothing is saved
        context.__enter__()
        self._contexts.append(context)

    def _leave(self, module, args, output) -> None:
        if self._contexts:
            self._contexts.pop().__exit__(None, None, None)
        self._unload()

    def _pack(self, t):
        """A saved block weight (the parameter or a view of it) by reference; else ``t`` itself."""
        base = t if id(t) in self.where or t._base is None else t._base
        hit = self.where.get(id(base))
        if hit is None or t.dtype != base.dtype:
            return t
        return _Saved(
            hit[0], hit[1], t.dtype, tuple(t.size()), tuple(t.stride()), t.storage_offset() - base.storage_offset()
        )

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        self._load(saved.group)
        src = saved.param.data
        if src.dtype != saved.dtype:  # saved while diffusers' layerwise casting had upcast the parameter itself
            src = src.to(saved.dtype)
        return src.as_strided(saved.size, saved.stride, src.storage_offset() + saved.offset)

    def remove(self) -> None:
        """Every frozen weight back on its device (bit-identical), every hook gone."""
        for handle in self.handles:
            handle.remove()
        while self._contexts:
            self._contexts.pop().__exit__(None, None, None)
        for group in self.host:
            for p, host, home in group:
                p.data = host.to(home)
        self.handles, self.host, self.where, self.loaded = [], [], {}, None

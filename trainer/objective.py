"""What one training step sees: the prompts of the cached data, the batch stream, noise and the loss.

Everything random in a step is a pure function of ``(seed, sample position)``: the data order (a seeded
permutation per epoch), the noise and the timesteps. A resumed run therefore continues exactly where the
first one stopped. Every training element keeps its own prompt embedding: instance images pair with their
caption (or the instance prompt) and class images with the class prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..manager.errors import InvalidInputError

SEED_SPACE = 2**64  # every seed the widgets allow: 0 .. 2**64 - 1


def _position_generator(seed: int, position: int, salt: int = 0):
    import torch

    g = torch.Generator("cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(position) * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


@dataclass
class TrainData:
    """Cached tensors. ``*_prompt`` are indices into ``prompts``/``embeds``/``ids``; ``empty`` is the index of
    the empty prompt that caption dropout trains with (None when dropout is off)."""

    inst_latents: Any  # a [N, C, h, w] tensor, or a list of [C, h, w] when the images are in several buckets
    inst_prompt: list
    class_latents: Any = None
    class_prompt: list = field(default_factory=list)
    prompts: list = field(default_factory=list)
    embeds: list = field(default_factory=list)  # one tensor per prompt ([L_i, D] Z-Image, [77, D] SD1)
    ids: list = field(default_factory=list)  # token ids per prompt (only when training the text encoder)
    empty: int | None = None
    dropout: float = 0.0
    dop_prompt: dict = field(default_factory=dict)  # instance prompt index -> its DOP prompt's index


def _dop_prompt(prompt: str, trigger: str, class_word: str) -> str:
    """The prompt with the trigger replaced by the class word: "a photo of sks dog" -> "a photo of dog" (a trigger
    already followed by the class word is dropped), "sks on a beach" -> "dog on a beach"."""
    import re

    if not trigger or not re.search(rf"\b{re.escape(trigger)}\b", prompt):
        raise InvalidInputError(
            f"differential output preservation needs the trigger word {trigger!r} in every instance prompt or "
            f"caption; {prompt!r} has none")
    out = re.sub(rf"\b{re.escape(trigger)}\s+{re.escape(class_word)}\b", class_word, prompt)
    return re.sub(rf"\b{re.escape(trigger)}\b", class_word, out)


def plan_prompts(config, instance: list, class_data: list | None) -> TrainData:
    """Every element's prompt index and the distinct prompts (captions with the trigger applied, the class,
    empty and DOP prompts); no tensors yet, no model needed."""
    from .data import apply_trigger

    ids: dict[str, int] = {}  # the distinct prompts, in order of first use

    def prompt_id(p: str) -> int:
        return ids.setdefault(p, len(ids))

    trigger = config.trigger_word
    data = TrainData(
        inst_latents=None,
        inst_prompt=[prompt_id(apply_trigger(t.caption, trigger, t.source) if t.caption else config.instance_prompt)
                     for t in instance],
        dropout=float(config.caption_dropout),
    )
    if class_data is not None:
        data.class_prompt = [prompt_id(config.class_prompt) for _ in class_data]
    if data.dropout:
        data.empty = prompt_id("")
    if config.dop_weight:
        known = list(ids)
        data.dop_prompt = {i: prompt_id(_dop_prompt(known[i], trigger, config.dop_class))
                           for i in set(data.inst_prompt)}
    data.prompts = list(ids)
    return data


@dataclass
class Batch:
    latents: list  # per element: [C, h, w]
    prompt_index: list  # per element: index into TrainData.prompts
    is_prior: list  # per element
    positions: list  # per element: stream position (noise and timestep are derived from it)


def _epoch_groups(seed: int, epoch: int, buckets: list, batch_size: int, salt: int) -> list[list[int]]:
    """One epoch of batches drawn within aspect-ratio buckets: each bucket shuffled and cut into batches,
    then the batches shuffled; a pure function of ``(seed, epoch)``."""
    import torch

    groups = []
    for k, key in enumerate(sorted(set(buckets))):
        members = [i for i, b in enumerate(buckets) if b == key]
        order = torch.randperm(len(members), generator=_position_generator(seed, epoch, 31 + salt + 7 * k)).tolist()
        groups += [[members[j] for j in order[i : i + batch_size]] for i in range(0, len(members), batch_size)]
    shuffle = torch.randperm(len(groups), generator=_position_generator(seed, epoch, 29 + salt)).tolist()
    return [groups[j] for j in shuffle]


def _draw(latents: list, seed: int, group: int, batch_size: int, salt: int) -> list[int]:
    """The images of batch number ``group`` of the endless stream: consecutive positions of the epoch-shuffled
    stream when all images share one size, else one bucket's batch."""
    import torch

    buckets, n = [tuple(t.shape) for t in latents], len(latents)
    if len(set(buckets)) == 1:  # image i of epoch e: a seeded permutation of the n images
        places = [divmod(group * batch_size + j, n) for j in range(batch_size)]
        return [int(torch.randperm(n, generator=_position_generator(seed, e, 11 + salt))[i]) for e, i in places]
    per_epoch = len(_epoch_groups(seed, 0, buckets, batch_size, salt))
    epoch, offset = divmod(group, per_epoch)
    return _epoch_groups(seed, epoch, buckets, batch_size, salt)[offset]


def _dropped(seed: int, position: int, rate: float) -> bool:
    import torch

    return rate > 0 and float(torch.rand((), generator=_position_generator(seed, position, 5))) < rate


def assemble_batch(data: TrainData, seed: int, micro_index: int, batch_size: int, rank: int, world: int,
                   with_prior: bool) -> Batch:
    """The elements one process trains on at one micro-step; each keeps its own prompt."""
    group = micro_index * world + rank
    inst = _draw(data.inst_latents, seed, group, batch_size, 0)
    positions = [group * batch_size + j for j in range(len(inst))]
    latents = [data.inst_latents[i] for i in inst]
    prompt_index = [data.empty if _dropped(seed, p, data.dropout) else data.inst_prompt[i]
                    for i, p in zip(inst, positions, strict=True)]
    is_prior = [False] * len(inst)
    if with_prior:
        cls = _draw(data.class_latents, seed, group, batch_size, 1)
        latents += [data.class_latents[i] for i in cls]
        prompt_index += [data.class_prompt[i] for i in cls]
        is_prior += [True] * len(cls)
        positions += [group * batch_size + j + (1 << 40) for j in range(len(cls))]
    return Batch(latents, prompt_index, is_prior, positions)


class _Objective:
    """Noise, timesteps and targets per family; everything derived from the element positions."""

    def __init__(self, pipe, family: str, seed: int, timestep_sampling: str = "uniform", shift: float = 3.0):
        self.family = family
        self.seed = seed
        self.sampling, self.shift = timestep_sampling, float(shift)
        if family == "zimage":
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self.num_train_timesteps = int(sched.config.num_train_timesteps)
            self.sigmas = sched.sigmas.float().cpu()
            self.timesteps = sched.timesteps.float().cpu()
        else:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
            self.prediction_type = self.scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise InvalidInputError(
                    f"the model's scheduler predicts {self.prediction_type!r}; training supports 'epsilon' and "
                    "'v_prediction'"
                )

    def draw(self, positions: list, shape) -> tuple:
        """Noise and a timestep per element, from its position. Flow-matching timesteps (Z-Image) are drawn by
        ``timestep_sampling``; each way in one line:

        * ``uniform``: every training timestep of the model's own (shifted) schedule equally likely, as
          diffusers' Z-Image DreamBooth script samples them (``weighting_scheme="none"``);
        * ``logit_normal``: ``u = sigmoid(N(0, 1))`` picks from that schedule, favouring middle noise levels (SD3);
        * ``shifted``: ``sigma = s*u / (1 + (s-1)*u)`` with ``u`` uniform and ``s = timestep_shift``, continuous.

        Returns (noise, schedule index or None, sigma or None) batched per element."""
        import torch
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noises, idx, sigmas = [], [], []
        for p in positions:
            g = _position_generator(self.seed, p, 3)
            noises.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
            if self.family != "zimage" or self.sampling == "uniform":
                idx.append(int(torch.randint(0, self.num_train_timesteps, (1,), generator=g)))
                continue
            scheme = "logit_normal" if self.sampling == "logit_normal" else "none"
            u = float(compute_density_for_timestep_sampling(scheme, 1, 0.0, 1.0, generator=g)[0])
            if self.sampling == "logit_normal":
                idx.append(min(int(u * self.num_train_timesteps), self.num_train_timesteps - 1))
            else:
                sigmas.append(self.shift * u / (1 + (self.shift - 1) * u))
        if sigmas:
            return torch.stack(noises), None, torch.tensor(sigmas, dtype=torch.float32)
        return torch.stack(noises), torch.tensor(idx, dtype=torch.long), None

    def predict_and_target(self, denoiser, latents, cond, positions, device, dtype) -> tuple:
        """Model prediction and regression target, both float32 on ``device``."""
        import torch

        noise, idx, drawn = self.draw(positions, latents.shape[1:])
        x0 = latents.to(device)
        noise = noise.to(device)
        if self.family == "zimage":
            # Flow matching as ZImagePipeline samples it: x_t = (1 - s) x0 + s noise; the model
            # takes t = 1 - s and its negated output is the velocity noise - x0.
            sigma = (self.sigmas[idx] if drawn is None else drawn).to(device).view(-1, 1, 1, 1)
            timesteps = self.timesteps[idx].to(device) if drawn is None else drawn.to(device) * 1000.0
            noisy = (1.0 - sigma) * x0 + sigma * noise
            model_t = (1000.0 - timesteps) / 1000.0
            inputs = list(noisy.to(dtype).unsqueeze(2).unbind(0))
            out = denoiser(inputs, model_t, cond, return_dict=False)[0]
            return -torch.stack([o.float() for o in out]).squeeze(2), noise - x0
        t = idx.to(device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = denoiser(noisy.to(dtype), t, cond.to(dtype), return_dict=False)[0].float()
        return pred, self.scheduler.get_velocity(x0, noise, t) if self.prediction_type == "v_prediction" else noise

    def loss(self, denoiser, batch: Batch, cond, device, dtype, prior_loss_weight: float | None, dop=None):
        """Mean squared error of the instance elements, plus the weighted prior term when it is on.
        ``cond(prompt_index)`` is the text conditioning of those prompts."""
        import torch

        def errors(rows, latents, positions):
            c = cond([batch.prompt_index[i] for i in rows])
            return _mse(*self.predict_and_target(denoiser, latents, c, positions, device, dtype))

        per_elem = _by_size(batch, range(len(batch.latents)), errors)
        mask = torch.tensor(batch.is_prior, device=per_elem.device)
        loss = per_elem[~mask].mean()
        if prior_loss_weight is not None:
            loss = loss + prior_loss_weight * per_elem[mask].mean()
        if dop is not None:  # (weight, DOP prompts, LoRA-off context)
            penalty = self.dop_loss(denoiser, batch, cond, device, dtype, dop[1], dop[2])
            loss = loss if penalty is None else loss + dop[0] * penalty
        return loss

    def dop_loss(self, denoiser, batch: Batch, cond, device, dtype, dop_prompt: dict, without_lora) -> Any:
        """Differential output preservation: for the instance elements, the DOP prompt (the trigger replaced by
        the class word) is run with the LoRA and, under ``without_lora()``, without it, on the same noisy
        latents; the squared difference is the penalty. Only the LoRA gets its gradient (the other pass is
        under no_grad). None when no element has a DOP prompt (caption dropout)."""
        import torch

        def errors(rows, latents, positions):
            c = cond([dop_prompt[batch.prompt_index[i]] for i in rows])
            with_lora, _ = self.predict_and_target(denoiser, latents, c, positions, device, dtype)
            with torch.no_grad(), without_lora():
                base, _ = self.predict_and_target(denoiser, latents, c, positions, device, dtype)
            return _mse(with_lora, base)

        rows = [i for i, (prior, p) in enumerate(zip(batch.is_prior, batch.prompt_index, strict=True))
                if not prior and p in dop_prompt]
        return _by_size(batch, rows, errors).mean() if rows else None


def _mse(pred, target):
    """Mean squared error per element of a batch."""
    return ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)


def _by_size(batch: Batch, rows, errors) -> Any:
    """``errors(rows, latents, positions)`` over ``rows`` of ``batch``, one forward per latent size (instance
    and class images can be in different buckets), returned in ``rows`` order."""
    import torch

    out = {}
    for shape in dict.fromkeys(tuple(batch.latents[i].shape) for i in rows):
        sub = [i for i in rows if tuple(batch.latents[i].shape) == shape]
        latents = torch.stack([batch.latents[i] for i in sub])
        out.update(zip(sub, errors(sub, latents, [batch.positions[i] for i in sub]), strict=True))
    return torch.stack([out[i] for i in rows])

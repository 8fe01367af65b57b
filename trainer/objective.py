"""What one training step sees: cached latents and prompt embeddings, the batch stream, noise and the loss.

Everything random in a step is a pure function of ``(seed, sample position)``: the data order (a seeded
permutation per epoch), the noise and the timesteps. A resumed run therefore continues exactly where the
first one stopped. Every training element keeps its own prompt embedding: instance images pair with their
caption (or the instance prompt) and class images with the class prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..manager.errors import Interrupted, InvalidInputError
from ..manager.families import defaults_for

SEED_SPACE = 2**64  # every seed the widgets allow: 0 .. 2**64 - 1


def _position_generator(seed: int, position: int, salt: int = 0):
    import torch

    g = torch.Generator("cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(position) * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


def data_index(seed: int, position: int, n: int, salt: int = 0) -> int:
    """Which of ``n`` items sits at ``position`` of the endless, epoch-shuffled stream."""
    import torch

    epoch, offset = divmod(int(position), n)
    return int(torch.randperm(n, generator=_position_generator(seed, epoch, 11 + salt))[offset])


def _check_stop(should_stop: Callable[[], bool] | None, what: str) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted(f"training stopped while {what}; nothing was trained yet. Queue it again to start")


# ---------------------------------------------------------------------------
# caching latents and prompt embeddings
# ---------------------------------------------------------------------------


def _latent_list(pipe, family: str, images: list, device, should_stop: Callable[[], bool] | None = None) -> list:
    """One [C, h, w] latent per image (frozen VAE, the family's shift and scale)."""
    import torch

    from .data import pil_to_tensor

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for img in images:
            _check_stop(should_stop, "caching image latents")
            px = pil_to_tensor(img).unsqueeze(0).to(device=device, dtype=vae.dtype)
            lat = vae.encode(px).latent_dist.mode().float()
            if family == "zimage":
                lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
            else:
                lat = lat * vae.config.scaling_factor
            out.append(lat[0].cpu())
    return out


def _batched(latents: list) -> Any:
    """[N, C, h, w] when every image is in one bucket, else the list of [C, h, w] tensors."""
    import torch

    return torch.stack(latents) if len({tuple(t.shape) for t in latents}) == 1 else latents


def _encode_latents(pipe, family: str, images: list, device, should_stop: Callable[[], bool] | None = None) -> Any:
    return _batched(_latent_list(pipe, family, images, device, should_stop))


def _encode_prompt(pipe, family: str, prompt: str, device):
    import torch

    with torch.no_grad():
        if family == "zimage":
            emb, _ = pipe.encode_prompt([prompt], device, do_classifier_free_guidance=False,
                                        max_sequence_length=defaults_for("zimage").max_sequence_length)
        else:
            emb, _ = pipe.encode_prompt(prompt, device, 1, False)
    return emb[0].float().cpu()


def _token_ids(pipe, prompt: str):
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids[0]


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

    prompts: list[str] = []

    def prompt_id(p: str) -> int:
        if p not in prompts:
            prompts.append(p)
        return prompts.index(p)

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
        data.dop_prompt = {i: prompt_id(_dop_prompt(prompts[i], trigger, config.dop_class))
                           for i in set(data.inst_prompt)}
    data.prompts = prompts
    return data


def tensor_names(config, data: TrainData, n_instance: int, n_class: int) -> list[str]:
    """The names :func:`encode_data` gives the tensors: latents per image, embeddings per prompt."""
    embeds = 0 if config.train_text_encoder else len(data.prompts)
    return ([f"instance.{i}" for i in range(n_instance)] + [f"class.{i}" for i in range(n_class)]
            + [f"embed.{j}" for j in range(embeds)])


def encode_data(pipe, family: str, config, data: TrainData, instance: list, class_data: list | None, device,
                should_stop: Callable[[], bool] | None = None) -> dict:
    """The encoders' part, by :func:`tensor_names`: VAE latents of the images and, unless the text encoder is
    trained, the frozen text encoder's embedding of every prompt."""
    tensors = {}
    for what, items in (("instance", instance), ("class", class_data or [])):
        latents = _latent_list(pipe, family, [t.image for t in items], device, should_stop)
        tensors.update({f"{what}.{i}": t for i, t in enumerate(latents)})
    if not config.train_text_encoder:
        for j, p in enumerate(data.prompts):
            _check_stop(should_stop, "encoding prompts")
            tensors[f"embed.{j}"] = _encode_prompt(pipe, family, p, device)
    return tensors


def fill_data(pipe, config, data: TrainData, tensors: dict, n_instance: int, n_class: int | None) -> TrainData:
    """``data`` with the tensors of :func:`encode_data` in place (token ids when the text encoder is trained)."""
    data.inst_latents = _batched([tensors[f"instance.{i}"] for i in range(n_instance)])
    if n_class is not None:
        data.class_latents = _batched([tensors[f"class.{i}"] for i in range(n_class)])
    if config.train_text_encoder:
        data.ids = [_token_ids(pipe, p) for p in data.prompts]
    else:
        data.embeds = [tensors[f"embed.{j}"] for j in range(len(data.prompts))]
    return data


def cache_data(pipe, family: str, config, instance: list, class_data: list | None, device,
               should_stop: Callable[[], bool] | None = None) -> TrainData:
    """Latents (frozen VAE) and prompt embeddings (frozen text encoder) or token ids (trained one), in memory."""
    data = plan_prompts(config, instance, class_data)
    tensors = encode_data(pipe, family, config, data, instance, class_data, device, should_stop)
    return fill_data(pipe, config, data, tensors, len(instance), None if class_data is None else len(class_data))


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
    buckets = [tuple(t.shape) for t in latents]
    if len(set(buckets)) == 1:
        return [data_index(seed, group * batch_size + j, len(latents), salt) for j in range(batch_size)]
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
    pos = list(positions)
    if with_prior:
        cls = _draw(data.class_latents, seed, group, batch_size, 1)
        latents += [data.class_latents[i] for i in cls]
        prompt_index += [data.class_prompt[i] for i in cls]
        is_prior += [True] * len(cls)
        pos += [group * batch_size + j + (1 << 40) for j in range(len(cls))]
    return Batch(latents, prompt_index, is_prior, pos)


# ---------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------


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

        Elements of one size run in one forward pass; elements of other sizes (instance and class images in
        different buckets) in one pass per size."""
        import torch

        per_elem = [None] * len(batch.latents)
        for shape in dict.fromkeys(tuple(t.shape) for t in batch.latents):
            rows = [i for i, t in enumerate(batch.latents) if tuple(t.shape) == shape]
            sub = cond([batch.prompt_index[i] for i in rows]) if callable(cond) else cond
            pred, target = self.predict_and_target(denoiser, torch.stack([batch.latents[i] for i in rows]), sub,
                                                   [batch.positions[i] for i in rows], device, dtype)
            errors = ((pred.float() - target.float()) ** 2).reshape(pred.shape[0], -1).mean(1)
            for k, i in enumerate(rows):
                per_elem[i] = errors[k]
        per_elem = torch.stack(per_elem)
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

        rows = [i for i, (prior, p) in enumerate(zip(batch.is_prior, batch.prompt_index, strict=True))
                if not prior and p in dop_prompt]
        if not rows:
            return None
        errors = []
        for shape in dict.fromkeys(tuple(batch.latents[i].shape) for i in rows):
            sub = [i for i in rows if tuple(batch.latents[i].shape) == shape]
            latents, positions = torch.stack([batch.latents[i] for i in sub]), [batch.positions[i] for i in sub]
            c = cond([dop_prompt[batch.prompt_index[i]] for i in sub])
            with_lora, _ = self.predict_and_target(denoiser, latents, c, positions, device, dtype)
            with torch.no_grad(), without_lora():
                base, _ = self.predict_and_target(denoiser, latents, c, positions, device, dtype)
            errors.append(((with_lora.float() - base.float()) ** 2).reshape(len(sub), -1).mean(1))
        return torch.cat(errors).mean()

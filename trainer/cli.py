"""Command-line training: ``python -m turbobooth train --config run.yaml``.

Works in one process or under ``torchrun --nproc_per_node N`` (each process
loads the model, trains its share of every batch, gradients are averaged).
The config file is a :class:`~turbobooth.trainer.config.TrainConfig` in YAML
or JSON and must name ``model_source`` and ``instance_data_dir``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..manager.errors import TurboBoothError, get_logger

logger = get_logger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_STOPPED = 0, 2, 3
# The TrainConfig settings a flag overrides: what the flag's value is, and what its help adds.
_OVERRIDES = {
    "output_dir": ({}, ""),
    "resume": ({}, " ('latest' or a checkpoint folder)"),
    "steps": ({"type": int}, ""),
    "cache_to_disk": ({"action": argparse.BooleanOptionalAction}, ": keep the latents and prompt embeddings in "
                      "output_dir so that a resumed run skips the VAE and text encoder"),
}


def _parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(prog="turbobooth train",
                                description="train a DreamBooth LoRA (or SD1.x full fine-tune) from a config file")
    t.add_argument("--config", required=True, help="YAML or JSON TrainConfig file")
    for name, (kind, more) in _OVERRIDES.items():
        t.add_argument("--" + name.replace("_", "-"), default=None, help=f"override {name}{more}", **kind)
    t.add_argument("--lora-name", default="lora", help="file name (without .safetensors) of the saved LoRA")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the local GPU, else cpu)")
    t.add_argument("-v", "--verbose", action="store_true")
    return t


def _device(arg: str | None) -> str:
    if arg:
        return arg
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_pipeline_model(source: str, family: str, revision: str | None, device: str):
    """Load a TurboModel through the manager's loader (no cache: the CLI owns its model)."""
    from ..manager.loading import load_model
    from ..manager.spec import ModelSpec

    return load_model(ModelSpec(source=source, revision=revision, family=family, device=device))


def run_train(args) -> int:
    from ..manager.lora import save_lora_file
    from .config import TrainConfig
    from .runs import train

    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    cfg = TrainConfig.load(args.config).replace(**overrides)
    if not cfg.model_source:
        raise TurboBoothError("the config needs model_source: a diffusers model folder (or Hugging Face repo id)")
    if not cfg.instance_data_dir:
        raise TurboBoothError("the config needs instance_data_dir: a folder with the subject's photos")
    beside = os.path.join(os.path.dirname(os.path.abspath(args.config)), cfg.model_source)  # as given when absolute
    source = beside if os.path.exists(beside) else cfg.model_source
    model = load_pipeline_model(source, cfg.family, cfg.model_revision, _device(args.device))
    result = train(model, cfg, cfg.instance_data_dir)
    if int(os.environ.get("RANK", 0)) == 0:
        out = os.path.abspath(cfg.output_dir)
        if result.lora is not None:
            path = save_lora_file(result.lora, os.path.join(out, f"{args.lora_name}.safetensors"))
            logger.info("LoRA saved to %s", path)
        elif result.model is not None:
            folder = os.path.join(out, "model")
            result.model.pipe.save_pretrained(folder, safe_serialization=True)
            logger.info("fine-tuned model saved to %s", folder)
        logger.info("final loss %.5f after %d of %d steps", result.losses[-1] if result.losses else float("nan"),
                    result.step, result.total_steps)
    if result.stopped:
        logger.info("training stopped; run again with --resume latest to continue")
        return EXIT_STOPPED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``main(["--config", "run.yaml"])``; a leading ``"train"`` is accepted too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("turbobooth").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return run_train(args)
    except TurboBoothError as e:
        logger.error("%s", e)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

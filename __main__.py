"""Command line: ``python -m turbobooth generate|demo|train|tiny|serve``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("turbobooth")


def _parse_model(text: str):

    if "@" in text and not os.path.exists(text):
        source, revision = text.rsplit("@", 1)
        return source, revision or None
    return text, None


def save_png(image, path: str, metadata: dict | None = None) -> str:
    """Write one [H,W,C] 0..1 tensor as PNG, atomically."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    arr = (image.detach().cpu().float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), str(v))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    Image.fromarray(arr).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def cmd_generate(args) -> int:
    from .manager.cache import get_model
    from .manager.sampling import Guidance, generate
    from .manager.spec import ModelSpec

    source, revision = _parse_model(args.model)
    spec = ModelSpec(source, revision=revision, family=args.family, dtype=args.dtype, device=args.device)
    model = get_model(spec)
    guidance = None
    if args.guidance is not None or args.negative:
        scale = args.guidance if args.guidance is not None else (4.0 if model.family == "zimage" else 7.5)
        guidance = Guidance(negative_prompts=(args.negative or "",), scales=(scale,))
    result = generate(
        model, args.prompts, seed=args.seed, steps=args.steps, width=args.width, height=args.height,
        images_per_prompt=args.count, sampler=args.sampler, shift=args.shift, guidance=guidance,
    )
    os.makedirs(args.out, exist_ok=True)
    k = 0
    for i, prompt in enumerate(result.prompts):
        for j in range(args.count):
            path = os.path.join(args.out, f"{args.prefix}_{i:03d}_{j:02d}.png")
            save_png(result.images[k], path, {"prompt": prompt, "seed": result.seeds[i], "model": args.model})
            print(path)
            k += 1
    return 0


def cmd_tiny(args) -> int:
    from .manager.tiny import write_tiny_models

    paths = write_tiny_models(args.out, seed=args.seed)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    for line in run_demo(args.out, seed=args.seed, steps=args.train_steps):
        print(line)
    return 0


def cmd_train(args) -> int:
    from .trainer.cli import main as train_main

    return train_main(args.rest)


def cmd_serve(args) -> int:
    from .serve.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbobooth", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate PNGs from prompts")
    g.add_argument("--model", required=True, help="diffusers folder, .safetensors checkpoint, or repo id[@revision]")
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="default: the family's (Z-Image-Turbo 8, SD1.x 25)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--count", type=int, default=1, help="images per prompt")
    g.add_argument("--sampler", default="euler")
    g.add_argument("--shift", type=float, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--negative", default="")
    g.add_argument("--family", default="auto", choices=["auto", "zimage", "sd1"])
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--out", default="outputs")
    g.add_argument("--prefix", default="turbobooth")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="personalize-then-generate on the built-in tiny model")
    d.add_argument("--out", default="demo_output")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--train-steps", type=int, default=30)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tiny", help="write the tiny offline test models in every layout")
    t.add_argument("--out", default="tiny_models")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny)

    sv = sub.add_parser("serve", help="the REST service (needs the serve extra: pip install turbobooth[serve])")
    from .serve.cli import add_arguments

    add_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    tr = sub.add_parser("train", help="DreamBooth training from a YAML/JSON config", add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # the trainer owns its whole command line (accelerate launch passes it through)
        from .trainer.cli import main as train_main

        return int(train_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # the CLI prints paths; library progress bars would only clutter that
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass
    from .manager.errors import TurboBoothError

    try:
        return int(args.func(args) or 0)
    except TurboBoothError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

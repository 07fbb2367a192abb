"""Baseline sampler for the benchmark: the original Text2Face `generate.py`, with its model and LoRA as flags.

As the original: the pipeline in fp16 on CUDA (fp32 elsewhere), the LoRA loaded as unfused PEFT adapters
on the UNet and the text encoder (`load_lora_weights`, `set_adapters` at weight 1.0), the model's own
scheduler, 50 steps, an empty negative prompt, `cross_attention_kwargs={"scale": 1.0}`, one image per call.

    python benchmarks/baseline_generate.py --base_model MODEL_DIR --lora LORA.safetensors \\
        --prompt "A happy 55 year old male with blond hair and a goatee smiles with visible teeth." \\
        --num_images 2 --height 256 --width 256 --output_dir OUT

Image i uses torch.Generator("cpu").manual_seed(seed + i), as generate.py. It prints
"N image(s) in X s": the time from loading the LoRA to the last image, model loading excluded.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

ADAPTER_NAME = "test_lora"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The original generate.py (benchmark baseline).")
    parser.add_argument("--base_model", required=True, help="Local diffusers folder or Hub id of SD2.1.")
    parser.add_argument("--lora", type=Path, required=True, help="LoRA .safetensors file (unet./text_encoder. keys).")
    parser.add_argument("--prompt", required=True, help="Text describing the face.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the CPU generator of the first image.")
    parser.add_argument("--num_images", type=int, default=1, help="Images to sample, one per pipeline call.")
    parser.add_argument("--steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--height", type=int, default=768, help="Image height in pixels.")
    parser.add_argument("--width", type=int, default=768, help="Image width in pixels.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda.")
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp16", "bf16", "fp32"],
        default="auto",
        help="Weight precision; auto is fp16 on cuda and fp32 elsewhere, as the original.",
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="Folder for the PNGs.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.float16 if device.startswith("cuda") else torch.float32
    )
    pipe = StableDiffusionPipeline.from_pretrained(
        args.base_model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(leave=False)

    start = time.perf_counter()
    pipe.load_lora_weights(args.lora, adapter_name=ADAPTER_NAME)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[1.0])
    images = [
        pipe(
            args.prompt,
            negative_prompt="",
            num_inference_steps=args.steps,
            height=args.height,
            width=args.width,
            cross_attention_kwargs={"scale": 1.0},
            generator=torch.Generator("cpu").manual_seed(args.seed + i),
        ).images[0]
        for i in range(args.num_images)
    ]
    elapsed = time.perf_counter() - start

    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(args.output_dir / f"{i:05d}-s{args.seed + i}.png")
    print(f"{len(images)} image(s) in {elapsed:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

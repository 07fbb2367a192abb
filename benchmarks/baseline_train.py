"""Baseline trainer for the benchmark: the original Text2Face `finetune_lora.py` training loop, trimmed.

It does what the original script and the diffusers example `train_text_to_image_lora.py` it was built
from do: PEFT LoRA on the UNet attention projections and the text encoder's self-attention, one AdamW
over both with a single learning rate, the VAE encoding every batch (nothing cached), images decoded
and transformed on every step through a `datasets` imagefolder, and `accelerator.save_state` without
save hooks at each checkpoint, which writes the whole UNet and text encoder with the LoRA injected,
plus the LoRA weights, as the original did. Only what the benchmark exercises is kept (no validation,
no trackers, no resume, no Hub upload); what remains is the original's arithmetic step by step.

    accelerate launch benchmarks/baseline_train.py --pretrained_model_name_or_path MODEL_DIR \\
        --train_data_dir FACES_DIR --resolution 256 --center_crop --train_batch_size 1 \\
        --max_train_steps 6 --checkpointing_steps 6 --rank 8 --text_encoder_rank 8 \\
        --learning_rate 1e-4 --output_dir OUT --seed 0
"""

import argparse
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The original LoRA fine-tuning loop (benchmark baseline).")
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="Local diffusers folder or Hub id.")
    parser.add_argument("--train_data_dir", required=True, help="Imagefolder with images and a metadata.jsonl.")
    parser.add_argument("--output_dir", required=True, help="Where checkpoints and the final LoRA are written.")
    parser.add_argument("--resolution", type=int, default=512, help="Square training resolution in pixels.")
    parser.add_argument("--center_crop", action="store_true", help="Center-crop instead of random crops.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip images horizontally.")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Images per optimizer step.")
    parser.add_argument("--max_train_steps", type=int, required=True, help="Optimizer steps to run.")
    parser.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save the full accelerate state every this many steps."
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank in the UNet.")
    parser.add_argument("--text_encoder_rank", type=int, default=4, help="LoRA rank in the text encoder.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="One learning rate for both models.")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loading subprocesses.")
    parser.add_argument("--seed", type=int, default=None, help="Seed for reproducible training.")
    return parser.parse_args(argv)


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool) -> torch.Tensor:
    """torchvision's Resize(shorter side) -> Center/RandomCrop -> flip -> ToTensor -> Normalize(0.5, 0.5)."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    image = image.resize(
        (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.BILINEAR
    )
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = random.randint(0, image.width - resolution), random.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and random.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def make_dataloader(args, tokenizer):
    """The original's imagefolder dataset: every access decodes, resizes and crops the image again."""
    dataset = load_dataset("imagefolder", data_files={"train": os.path.join(args.train_data_dir, "**")})["train"]

    def preprocess(examples):
        examples["pixel_values"] = [
            image_to_tensor(image, args.resolution, args.center_crop, args.random_flip) for image in examples["image"]
        ]
        examples["input_ids"] = tokenizer(
            examples["text"],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return examples

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).float(),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
        }

    return torch.utils.data.DataLoader(
        dataset.with_transform(preprocess),
        shuffle=True,
        collate_fn=collate,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator()
    if args.seed is not None:
        set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    model = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (unet, vae, text_encoder):
        frozen.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(r=args.rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    text_encoder.add_adapter(
        LoraConfig(
            r=args.text_encoder_rank,
            init_lora_weights="gaussian",
            target_modules=["q_proj", "v_proj", "k_proj", "out_proj"],
        )
    )
    lora_parameters = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    for parameter in lora_parameters:  # as the diffusers example: fp16 LoRA weights cannot be unscaled by AMP
        parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate, weight_decay=1e-2)
    train_dataloader = make_dataloader(args, tokenizer)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, text_encoder, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, text_encoder, optimizer, train_dataloader, lr_scheduler
    )

    num_epochs = math.ceil(args.max_train_steps / len(train_dataloader))
    progress_bar = tqdm(range(args.max_train_steps), desc="Steps", disable=not accelerator.is_local_main_process)
    global_step = 0
    for _ in range(num_epochs):
        unet.train()
        text_encoder.train()
        for batch in train_dataloader:
            if global_step >= args.max_train_steps:
                break
            latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
            ).long()
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"])[0]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

            progress_bar.update(1)
            global_step += 1
            if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                accelerator.save_state(save_path)
                StableDiffusionPipeline.save_lora_weights(
                    save_directory=save_path,
                    unet_lora_layers=get_peft_model_state_dict(accelerator.unwrap_model(unet)),
                    text_encoder_lora_layers=get_peft_model_state_dict(accelerator.unwrap_model(text_encoder)),
                    safe_serialization=True,
                )
            progress_bar.set_postfix(loss=loss.detach().item())

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        StableDiffusionPipeline.save_lora_weights(
            save_directory=args.output_dir,
            unet_lora_layers=get_peft_model_state_dict(accelerator.unwrap_model(unet)),
            text_encoder_lora_layers=get_peft_model_state_dict(accelerator.unwrap_model(text_encoder)),
            safe_serialization=True,
        )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())

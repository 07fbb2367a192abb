"""CLIP score and attribute agreement of the images in a folder that generate.py wrote (work in progress)."""

import torch


def clip_embeddings(model, processor, images, texts, device, batch_size: int = 32) -> tuple:
    """(image_features, text_features): the CLIP embeddings of `images` (PIL images, or paths opened a batch at a
    time) and of `texts`, each row of length 1, so that a dot product is a cosine. The CLIP score of an image and
    its prompt is 100 * max(cosine, 0) (Hessel et al. 2021, as torchmetrics' CLIPScore); CLIP's zero-shot choice
    among texts is the one of highest cosine. `model` (a transformers CLIPModel, already on `device`) sees the
    inputs through its own `processor`, each text cut to its context (max_position_embeddings tokens), `batch_size`
    images or texts per forward pass."""
    from PIL import Image

    def rgb(image):
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        with Image.open(image) as opened:
            return opened.convert("RGB")

    def unit(batches: list, width: int) -> torch.Tensor:
        features = torch.cat(batches) if batches else torch.empty(0, width)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    limit = model.config.text_config.max_position_embeddings
    image_batches, text_batches = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = [rgb(image) for image in images[start : start + batch_size]]
            pixels = processor(images=batch, return_tensors="pt").pixel_values.to(device)
            image_batches.append(model.get_image_features(pixel_values=pixels).pooler_output)
        for start in range(0, len(texts), batch_size):
            tokens = processor.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            ).to(device)
            text_batches.append(model.get_text_features(**tokens).pooler_output)
    width = model.config.projection_dim
    return unit(image_batches, width).cpu(), unit(text_batches, width).cpu()

"""What tools/audit.py --train_data_dir costs: image-embedding throughput, and the nearest-neighbour search.

Throughput: tools/audit.py's own embed_images (PNG decoding, the model's preprocessing, batches of 32, the forward
pass) over --images random-noise PNGs of --image_size pixels (FFHQ's are 1024), with a random-weight model built
from its config (the compute of the real one: weights do not change it): `tiny` is the test fixture's CLIP,
`clip-vit-l-14` the image tower of openai/clip-vit-large-patch14 (the default), `dinov2-base` facebook/dinov2-base.
Search: nearest_training on random unit vectors, --train training against --generated generated embeddings of
--dim dimensions (768: ViT-L/14's projection and DINOv2-base's width), in blocks of --block_size, checked against
one full matrix product; the median of --repeats. The last line is the figures as JSON.

    python benchmarks/bench_audit.py --model clip-vit-l-14 --images 32
    python benchmarks/bench_audit.py --model tiny --images 256 --image_size 64
"""

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("audit", REPO / "tools" / "audit.py")
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)

VISION = {  # image towers, as in the Hub configs of the models named
    "tiny": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
    "clip-vit-l-14": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    "dinov2-base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
}
FFHQ, LAION_FACE = 70_000, 156_000  # training images


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n" + __doc__[__doc__.index("    python") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", choices=list(VISION), default="clip-vit-l-14", help="the image encoder's shape")
    parser.add_argument("--images", type=int, default=32, help="PNGs embedded for the throughput (default: 32)")
    parser.add_argument("--image_size", type=int, default=1024, help="their pixels a side (default: 1024, FFHQ's)")
    parser.add_argument("--train", type=int, default=10_000, help="training embeddings searched (default: 10000)")
    parser.add_argument("--generated", type=int, default=1_000, help="generated embeddings (default: 1000)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimensions (default: 768)")
    parser.add_argument("--block_size", type=int, default=4096, help="as tools/audit.py's (default: 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="search timings, the median reported (default: 3)")
    parser.add_argument("--device", default="cpu", help="of the embedding: cpu (the default) or cuda[:N]")
    return parser.parse_args(argv)


def build_encoder(name: str):
    """(model, processor): a random-weight image encoder of the shape `name`, in fp32, with its preprocessing."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    if name == "dinov2-base":
        model = Dinov2Model(Dinov2Config(**VISION[name], image_size=518, patch_size=14))
        return model.eval(), BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    size, patch = (32, 8) if name == "tiny" else (224, 14)
    text = {**VISION["tiny"], "vocab_size": 49408}  # the text tower is never run here
    config = CLIPConfig(text_config=text, vision_config={**VISION[name], "image_size": size, "patch_size": patch})
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPModel(config).eval(), processor


def throughput(args) -> float:
    """Images per second through audit.embed_images over random-noise PNGs, after one warm-up batch."""
    model, processor = build_encoder(args.model)
    model.to(args.device)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for number in range(args.images):
            pixels = torch.randint(0, 256, (args.image_size, args.image_size, 3), dtype=torch.uint8).numpy()
            paths.append(Path(folder) / f"{number:05d}.png")
            Image.fromarray(pixels).save(paths[-1])
        audit.embed_images(model, processor, paths[:2], args.device)
        start = time.perf_counter()
        audit.embed_images(model, processor, paths, args.device)
        return args.images / (time.perf_counter() - start)


def search_seconds(args) -> float:
    """The median time of audit.nearest_training (on the CPU, as tools/audit.py runs it), its answer checked against
    one full matrix product."""
    generator = torch.Generator().manual_seed(0)
    training, generated = (torch.randn(count, args.dim, generator=generator) for count in (args.train, args.generated))
    training, generated = (torch.nn.functional.normalize(vectors, dim=-1) for vectors in (training, generated))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _, index = audit.nearest_training(generated, training, args.block_size)
        times.append(time.perf_counter() - start)
    assert torch.equal(index, (generated @ training.T).argmax(dim=1)), "the blocked search differs from brute force"
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}")
    rate = throughput(args)
    print(f"embedding: {rate:.2f} images/s ({args.model}, {args.image_size} px PNGs, {args.images} images)")
    for name, count in (("FFHQ", FFHQ), ("LAION-Face", LAION_FACE)):
        print(f"  {name}, {count:,} images: {count / rate / 3600:.2f} h to embed once")
    seconds = search_seconds(args)
    print(f"search: {seconds:.3f} s for {args.train:,} training x {args.generated:,} generated ({args.dim} dims)")
    for name, count in (("FFHQ", FFHQ), ("LAION-Face", LAION_FACE)):
        print(f"  {name}: about {seconds * count / args.train:.2f} s (linear in the training images)")
    report = {"model": args.model, "images_per_s": round(rate, 3), "search_s": round(seconds, 4)}
    print(json.dumps({**report, "train": args.train, "generated": args.generated, "dim": args.dim}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load a compiled moebuild model, run a forward pass on a sample image and a short generation.

    moebuild compile micro-moe-llava -o out/micro-moe-llava --force
    python examples/quickstart.py out/micro-moe-llava
"""

import sys

import numpy as np
import torch

import moebuild


def sample_image(size: int = 96) -> np.ndarray:
    """A colour gradient with a square in it: a stand-in photo that needs no download."""
    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // size, y * 255 // size, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    image[size // 4 : size // 2, size // 4 : size // 2] = (240, 40, 40)
    return image


def main(model_dir: str) -> None:
    model = moebuild.MoEVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = moebuild.build_processor(model.spec)
    images = processor([sample_image()])
    prompt = [model.config.bos_token_id, *[model.config.image_token_id] * images.num_image_tokens[0], 17, 42, 99]
    input_ids = torch.tensor([prompt])
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)

    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=images.pixel_values, labels=labels, output_router_stats=True)
    print(f"forward: {input_ids.shape[1]} tokens ({images.num_image_tokens[0]} image), logits {tuple(out.logits.shape)}")
    print(f"  loss {out.loss.item():.4f} = lm {out.lm_loss.item():.4f} + "
          + " + ".join(f"{name} {value.item():.4f}" for name, value in out.aux_losses.items()))

    generated = model.generate(
        input_ids=input_ids, pixel_values=images.pixel_values, max_new_tokens=8, do_sample=False
    )
    print(f"generate: new tokens {generated[0, input_ids.shape[1]:].tolist()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/micro-moe-llava")

"""Images in: ImageFolder walking and reading, transforms, the neighbour sampler, device decoding, the digit scenes."""
